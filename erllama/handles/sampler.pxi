# Sampler: one llama.cpp sampler chain per request.


cdef inline float _check_float(object value, str name, double lo, double hi) except? -1:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not isfinite(value) \
            or not (lo <= value <= hi):
        raise errors.InvalidParameter(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
    return <float>value


@cython.no_gc_clear
cdef class Sampler:
    """A sampler chain: grammar → repetition penalty → top_k → top_p → min_p → temperature +
    seeded dist, or greedy when ``temperature`` is 0.

    Samples from a context's sequence (:meth:`sample`) or from a logits buffer the caller
    holds (:meth:`sample_logits`, e.g. the logits stored with a cached state). Every sampled
    token is accepted into the chain (grammar and penalty state advance).
    """

    cdef L.llama_sampler * _ptr
    cdef readonly Model model
    cdef object _lock
    cdef L.llama_token_data * _cand
    cdef int _n_vocab
    cdef readonly dict params

    def __cinit__(self):
        self._ptr = NULL
        self._cand = NULL
        self._lock = threading.Lock()

    def __init__(self, Model model, *, grammar=None, double temperature=0.0, int top_k=0,
                 double top_p=1.0, double min_p=0.0, double repetition_penalty=1.0,
                 double frequency_penalty=0.0, double presence_penalty=0.0,
                 int penalty_last_n=64, seed=None, str grammar_root="root"):
        cdef L.llama_sampler * chain
        cdef L.llama_sampler * s
        cdef bytes bgrammar, broot
        cdef uint32_t cseed
        _check_float(temperature, "temperature", 0.0, 1e6)
        _check_float(top_p, "top_p", 1e-9, 1.0)
        _check_float(min_p, "min_p", 0.0, 1.0)
        _check_float(repetition_penalty, "repetition_penalty", 1e-6, 1e6)
        _check_float(frequency_penalty, "frequency_penalty", -2.0, 2.0)
        _check_float(presence_penalty, "presence_penalty", -2.0, 2.0)
        _check_int(top_k, "top_k", 0, 1 << 30)
        _check_int(penalty_last_n, "penalty_last_n", -1, 1 << 30)
        if seed is None:
            cseed = <uint32_t>L.LLAMA_DEFAULT_SEED
        else:
            _check_int(seed, "seed", 0, 0xFFFFFFFE)
            cseed = seed
        if grammar is not None and (not isinstance(grammar, str) or not grammar.strip()):
            raise errors.GrammarError(f"grammar must be non-empty GBNF text, got {grammar!r:.80}")
        model._attach()
        try:
            chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
            if chain == NULL:
                raise MemoryError("llama_sampler_chain_init returned NULL")
            self._ptr = chain
            self.model = model
            self._n_vocab = model.n_vocab
            _live_add("Sampler", 1)
            if grammar is not None:
                bgrammar = grammar.encode("utf-8")
                broot = grammar_root.encode("utf-8")
                L.erl_log_clear_recent()
                s = L.llama_sampler_init_grammar(model._vocab, bgrammar, broot)
                if s == NULL:
                    lines = recent_log_lines()
                    raise errors.GrammarError(
                        f"grammar does not parse: {lines[-1] if lines else 'no detail'} (grammar {grammar!r:.120})")
                L.llama_sampler_chain_add(chain, s)
            if repetition_penalty != 1.0 or frequency_penalty != 0.0 or presence_penalty != 0.0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_penalties(
                    model.n_vocab, penalty_last_n, repetition_penalty, frequency_penalty, presence_penalty))
            if top_k > 0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(top_k))
            if top_p < 1.0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(top_p, 1))
            if min_p > 0.0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_min_p(min_p, 1))
            if temperature > 0.0:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(temperature))
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(cseed))
            else:
                L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        except BaseException as exc:
            self._release()
            if isinstance(exc, Exception) and not isinstance(exc, errors.ErllamaError):
                raise errors.NativeError(f"llama.cpp failed to build a sampler chain: {exc}") from exc
            raise
        self.params = {
            "grammar": grammar, "temperature": temperature, "top_k": top_k, "top_p": top_p,
            "min_p": min_p, "repetition_penalty": repetition_penalty, "frequency_penalty": frequency_penalty,
            "presence_penalty": presence_penalty, "penalty_last_n": penalty_last_n, "seed": seed,
        }

    cdef void _release(self):
        cdef L.llama_sampler * ptr = self._ptr
        if ptr == NULL:
            if self.model is not None:
                self.model._detach()
                self.model = None
            return
        self._ptr = NULL
        try:
            L.llama_sampler_free(ptr)
        except Exception:
            pass
        if self._cand != NULL:
            free(self._cand)
            self._cand = NULL
        _live_add("Sampler", -1)
        if self.model is not None:
            self.model._detach()

    def free(self):
        """Free the chain (idempotent)."""
        with self._lock:
            if self._ptr != NULL:
                self._release()

    def __dealloc__(self):
        if self._ptr != NULL:
            self._release()
        elif self._cand != NULL:
            free(self._cand)

    cdef int _ensure_alive(self) except -1:
        if self._ptr == NULL:
            raise errors.Released("sampler was freed")
        return 0

    @property
    def seed(self):
        """The seed the dist stage uses (a random one when none was given), or None when greedy."""
        with self._lock:
            self._ensure_alive()
            if self.params["temperature"] <= 0.0:
                return None
            return L.llama_sampler_get_seed(self._ptr)

    def sample(self, Context ctx, seq_id):
        """Sample the next token of ``seq_id`` from the logits of ``ctx``'s last step."""
        cdef int32_t idx
        cdef L.llama_token tok
        if ctx.model is not self.model:
            raise errors.InvalidParameter("sampler and context belong to different models")
        with self._lock, _NativeErrors("sample"):
            self._ensure_alive()
            with ctx._lock:
                idx = ctx._logits_index(seq_id)
                with nogil:
                    tok = L.llama_sampler_sample(self._ptr, ctx._ptr, idx)
        return tok

    def sample_logits(self, logits):
        """Sample from a float32 logits buffer of length ``n_vocab`` (e.g. a restored row's)."""
        cdef const float[::1] src = np.ascontiguousarray(logits, dtype=np.float32)
        cdef L.llama_token_data_array cur
        cdef int i, n = self._n_vocab
        cdef L.llama_token tok
        if src.shape[0] != n:
            raise errors.InvalidParameter(f"logits hold {src.shape[0]} values, expected n_vocab={n}")
        with self._lock, _NativeErrors("sample_logits"):
            self._ensure_alive()
            if self._cand == NULL:
                self._cand = <L.llama_token_data *>malloc(n * sizeof(L.llama_token_data))
                if self._cand == NULL:
                    raise MemoryError()
            with nogil:
                for i in range(n):
                    self._cand[i].id = i
                    self._cand[i].logit = src[i]
                    self._cand[i].p = 0.0
                cur.data = self._cand
                cur.size = n
                cur.selected = -1
                cur.sorted = False
                L.llama_sampler_apply(self._ptr, &cur)
            if cur.selected < 0 or <size_t>cur.selected >= cur.size:
                raise errors.NoLogits("the sampler chain selected no token (grammar rejects every token?)")
            tok = cur.data[cur.selected].id
            L.llama_sampler_accept(self._ptr, tok)
        return tok

    def accept(self, tokens):
        """Feed tokens into the chain's state (penalties, grammar) without sampling."""
        cdef vector[L.llama_token] toks
        _fill_tokens(tokens, toks, self._n_vocab, "tokens")
        with self._lock, _NativeErrors("sampler accept"):
            self._ensure_alive()
            for i in range(toks.size()):
                L.llama_sampler_accept(self._ptr, toks[i])

    def reset(self):
        """Reset the chain's state (grammar position, penalty history)."""
        with self._lock:
            self._ensure_alive()
            L.llama_sampler_reset(self._ptr)
