# Context: KV memory, the multi-sequence step, logits, per-sequence state, embeddings.

KV_TYPES = {
    "f32": L.GGML_TYPE_F32, "f16": L.GGML_TYPE_F16, "bf16": L.GGML_TYPE_BF16,
    "q8_0": L.GGML_TYPE_Q8_0, "q4_0": L.GGML_TYPE_Q4_0, "q4_1": L.GGML_TYPE_Q4_1,
    "q5_0": L.GGML_TYPE_Q5_0, "q5_1": L.GGML_TYPE_Q5_1, "iq4_nl": L.GGML_TYPE_IQ4_NL,
}
FLASH_ATTN = {
    "auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO, True: L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    False: L.LLAMA_FLASH_ATTN_TYPE_DISABLED, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}
POOLING = {
    "unspecified": L.LLAMA_POOLING_TYPE_UNSPECIFIED, "none": L.LLAMA_POOLING_TYPE_NONE,
    "mean": L.LLAMA_POOLING_TYPE_MEAN, "cls": L.LLAMA_POOLING_TYPE_CLS,
    "last": L.LLAMA_POOLING_TYPE_LAST,
}


def default_threads():
    """The number of CPUs this process may run on (llama.cpp's default of 4 halves speed on 2 cores)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@cython.no_gc_clear
cdef class Context:
    """A llama.cpp context on a :class:`Model`: KV memory for up to ``n_seq_max`` sequences.

    All methods lock the context; :meth:`request_abort` does not, so another thread can
    interrupt a running :meth:`step`. Logits produced by a step are valid until the next
    step, state restore or sequence removal.
    """

    cdef L.llama_context * _ptr
    cdef L.llama_memory_t _mem
    cdef readonly Model model
    cdef object _lock
    cdef L.llama_batch _batch
    cdef bint _batch_ready
    cdef int _abort_flag
    cdef vector[int32_t] _out_idx
    cdef vector[L.llama_pos] _step_pos0
    cdef list _adapters
    cdef dict _parked
    cdef object _parked_cv
    cdef readonly int n_ctx
    cdef readonly int n_ctx_seq
    cdef readonly int n_batch
    cdef readonly int n_ubatch
    cdef readonly int n_seq_max
    cdef readonly int n_vocab
    cdef readonly int n_threads
    cdef readonly bint embeddings
    cdef readonly dict params

    def __cinit__(self):
        self._ptr = NULL
        self._mem = NULL
        self._batch_ready = False
        self._abort_flag = 0
        self._lock = threading.RLock()
        self._adapters = []
        self._parked = {}
        self._parked_cv = threading.Condition(self._lock)

    def __init__(self, *args, **kwargs):
        raise TypeError("Context is not instantiated directly; use Context.create(model, ...)")

    @staticmethod
    def create(Model model, *, n_ctx=512, n_batch=2048, n_ubatch=512, n_seq_max=1,
               n_threads=None, n_threads_batch=None, embeddings=False, type_k="f16",
               type_v="f16", flash_attn="auto", swa_full=True, pooling="unspecified",
               kv_unified=False):
        """Create a context. ``n_ctx`` is the total KV size (0 = the model's training size),
        split evenly between ``n_seq_max`` sequences unless ``kv_unified``."""
        cdef Context self = Context.__new__(Context)
        cdef L.llama_context_params p = L.llama_context_default_params()
        cdef L.llama_context * ptr
        cdef int max_seq = <int>L.llama_max_parallel_sequences()
        if n_threads is None:
            n_threads = default_threads()
        if n_threads_batch is None:
            n_threads_batch = n_threads
        _check_int(n_ctx, "n_ctx", 0, 1 << 24)
        _check_int(n_batch, "n_batch", 1, 1 << 20)
        _check_int(n_ubatch, "n_ubatch", 1, 1 << 20)
        _check_int(n_seq_max, "n_seq_max", 1, max_seq)
        _check_int(n_threads, "n_threads", 1, 1024)
        _check_int(n_threads_batch, "n_threads_batch", 1, 1024)
        _check_choice(type_k, "type_k", KV_TYPES)
        _check_choice(type_v, "type_v", KV_TYPES)
        _check_choice(flash_attn, "flash_attn", FLASH_ATTN)
        _check_choice(pooling, "pooling", POOLING)
        p.n_ctx = n_ctx
        p.n_batch = n_batch
        p.n_ubatch = min(n_ubatch, n_batch)
        p.n_seq_max = n_seq_max
        p.n_threads = n_threads
        p.n_threads_batch = n_threads_batch
        p.embeddings = bool(embeddings)
        p.type_k = KV_TYPES[type_k]
        p.type_v = KV_TYPES[type_v]
        p.flash_attn_type = FLASH_ATTN[flash_attn]
        p.swa_full = bool(swa_full)
        p.kv_unified = bool(kv_unified)
        p.pooling_type = POOLING[pooling]
        p.abort_callback = L.erl_abort_callback
        p.abort_callback_data = &self._abort_flag
        model._attach()
        try:
            if model.vocab_only:
                raise errors.NotSupported(f"model {model.path!r} was loaded vocab_only; it has no weights")
            L.erl_log_clear_recent()
            with nogil:
                ptr = L.llama_init_from_model(model._ptr, p)
            if ptr == NULL:
                lines = recent_log_lines()
                raise errors.ContextFailed(
                    f"llama.cpp could not create a context (n_ctx={n_ctx}, n_batch={n_batch}, "
                    f"n_seq_max={n_seq_max}, type_k={type_k!r}, type_v={type_v!r}): "
                    f"{lines[-1] if lines else 'no log output'}")
        except BaseException:
            model._detach()
            raise
        self._ptr = ptr
        self.model = model
        self._mem = L.llama_get_memory(ptr)
        self.n_ctx = L.llama_n_ctx(ptr)
        self.n_ctx_seq = L.llama_n_ctx_seq(ptr)
        self.n_batch = L.llama_n_batch(ptr)
        self.n_ubatch = L.llama_n_ubatch(ptr)
        self.n_seq_max = L.llama_n_seq_max(ptr)
        self.n_vocab = model.n_vocab
        self.n_threads = n_threads
        self.embeddings = bool(embeddings)
        self.params = {
            "n_ctx": self.n_ctx, "n_batch": self.n_batch, "n_ubatch": self.n_ubatch,
            "n_seq_max": self.n_seq_max, "n_threads": n_threads, "n_threads_batch": n_threads_batch,
            "embeddings": bool(embeddings), "type_k": type_k, "type_v": type_v,
            "flash_attn": flash_attn, "swa_full": bool(swa_full), "pooling": pooling,
            "kv_unified": bool(kv_unified),
        }
        self._out_idx.assign(self.n_seq_max, -1)
        self._step_pos0.assign(self.n_seq_max, -1)
        self._batch = L.llama_batch_init(self.n_batch, 0, 1)
        self._batch_ready = True
        _live_add("Context", 1)
        return self

    cdef int _ensure_alive(self) except -1:
        if self._ptr == NULL:
            raise errors.Released("context was freed")
        return 0

    cdef int _check_seq(self, seq_id) except -1:
        if isinstance(seq_id, bool) or not isinstance(seq_id, int) or not (0 <= seq_id < self.n_seq_max):
            raise errors.InvalidParameter(f"seq_id must be an int in [0, {self.n_seq_max}), got {seq_id!r}")
        return 0

    cdef int _check_writable(self, seq_id) except -1:
        self._check_seq(seq_id)
        if seq_id in self._parked:
            raise errors.InvalidParameter(f"seq {seq_id} is being copied out (state_get_parked); it cannot change now")
        return 0

    def free(self):
        """Free the context (idempotent). Its model may then complete a deferred free."""
        cdef L.llama_context * ptr
        with self._lock:
            while self._parked:  # a copy-out reads this context without the lock
                self._parked_cv.wait()
            ptr = self._ptr
            if ptr == NULL:
                return
            self._ptr = NULL
            self._mem = NULL
            self._release_native(ptr)

    cdef void _release_native(self, L.llama_context * ptr):
        for adapter in self._adapters:
            (<Adapter>adapter)._unuse()
        self._adapters = []
        try:
            with nogil:
                L.llama_free(ptr)
        except Exception:
            pass
        if self._batch_ready:
            L.llama_batch_free(self._batch)
            self._batch_ready = False
        _live_add("Context", -1)
        if self.model is not None:
            self.model._detach()

    def __dealloc__(self):
        cdef L.llama_context * ptr = self._ptr
        if ptr != NULL:
            warnings.warn("unfreed erllama Context", ResourceWarning)
            self._ptr = NULL
            self._release_native(ptr)

    @property
    def alive(self):
        """True until :meth:`free`."""
        return self._ptr != NULL

    # ---- abort (cancel) ----------------------------------------------------------------

    def request_abort(self):
        """Make the running (or next) decode stop at the next graph node; it raises ``Aborted``.

        Lock-free: callable from any thread while :meth:`step` runs. The flag stays set
        until :meth:`clear_abort`.
        """
        L.erl_flag_set(&self._abort_flag, 1)

    def clear_abort(self):
        """Clear the abort flag so decodes run again."""
        L.erl_flag_set(&self._abort_flag, 0)

    @property
    def abort_requested(self):
        """True while the abort flag is set."""
        return L.erl_flag_get(&self._abort_flag) != 0

    # ---- memory --------------------------------------------------------------------------

    def pos_max(self, seq_id):
        """The largest position held by ``seq_id`` (-1 when empty)."""
        with self._lock:
            self._ensure_alive()
            self._check_seq(seq_id)
            return L.llama_memory_seq_pos_max(self._mem, seq_id)

    def pos_min(self, seq_id):
        """The smallest position held by ``seq_id`` (-1 when empty)."""
        with self._lock:
            self._ensure_alive()
            self._check_seq(seq_id)
            return L.llama_memory_seq_pos_min(self._mem, seq_id)

    def n_past(self, seq_id):
        """Number of positions ``seq_id`` holds (its next position)."""
        return self.pos_max(seq_id) + 1

    def seq_rm(self, seq_id, int p0=0, int p1=-1):
        """Remove positions ``[p0, p1)`` of ``seq_id`` (``p1=-1``: to the end)."""
        with self._lock:
            self._ensure_alive()
            self._check_writable(seq_id)
            if p0 < 0 or (p1 >= 0 and p1 < p0):
                raise errors.InvalidParameter(f"seq_rm range [{p0}, {p1}) is invalid")
            self._out_idx[seq_id] = -1
            if not L.llama_memory_seq_rm(self._mem, seq_id, p0, p1):
                raise errors.NotSupported(f"this model's memory cannot remove a partial range [{p0}, {p1})")

    def seq_clear(self, seq_id):
        """Remove every position of ``seq_id``."""
        with self._lock:
            self._ensure_alive()
            self._check_writable(seq_id)
            self._out_idx[seq_id] = -1
            L.llama_memory_seq_rm(self._mem, seq_id, -1, -1)

    def seq_copy(self, src, dst):
        """Make ``dst`` hold exactly the positions of ``src`` (what ``dst`` held is removed);
        returns the positions copied.

        Only in a ``kv_unified`` context, where both sequences live in one KV stream and the
        copy shares cells: no data moves, whatever the length. Across streams llama.cpp
        would copy whole stream buffers at the next decode (a state read or write before
        that sees stale bytes) and asserts (aborts the process) on a partial range, so
        this method refuses that layout and always copies the full range.
        """
        with self._lock:
            self._ensure_alive()
            self._check_seq(src)
            self._check_writable(dst)
            if src == dst:
                raise errors.InvalidParameter(f"seq_copy needs two different sequences, got {src} twice")
            if not self.params["kv_unified"]:
                raise errors.NotSupported("seq_copy needs a kv_unified context (a copy across KV streams "
                                          "moves whole buffers later and aborts on partial ranges)")
            if self.model.is_recurrent:
                raise errors.NotSupported(f"seq_copy is for attention KV caches; {self.model.path!r} is a "
                                          f"recurrent or hybrid model")
            self._out_idx[dst] = -1
            L.llama_memory_seq_rm(self._mem, dst, -1, -1)
            L.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
            return L.llama_memory_seq_pos_max(self._mem, dst) + 1

    def clear(self):
        """Remove every sequence (after any copy-out in flight)."""
        with self._lock:
            while self._parked:
                self._parked_cv.wait()
            self._ensure_alive()
            self._out_idx.assign(self.n_seq_max, -1)
            L.llama_memory_clear(self._mem, True)

    # ---- the step --------------------------------------------------------------------------

    def step(self, rows):
        """Decode one batch mixing rows of several sequences; return the seq ids that got logits.

        ``rows`` is an iterable of ``(seq_id, tokens)`` or ``(seq_id, tokens, want_logits)``.
        A prefill row carries many tokens, a decode row one; each row continues its
        sequence at the sequence's next position. ``want_logits`` (default True) marks the
        row's last token for output. Everything is validated before llama.cpp runs; on a
        failed decode the sequences are rolled back to where they were and ``Aborted``,
        ``ContextOverflow`` or ``DecodeFailed`` is raised.
        """
        cdef vector[L.llama_token] toks
        cdef int32_t total = 0, j, k, rc
        cdef int seq
        cdef L.llama_pos pos0
        cdef L.llama_batch * b = &self._batch
        with self._lock:
            self._ensure_alive()
            seen = []
            logits_rows = []
            for row in rows:
                if not isinstance(row, tuple) or len(row) not in (2, 3):
                    raise errors.InvalidParameter(f"a step row must be (seq_id, tokens[, want_logits]), got {row!r:.80}")
                self._check_writable(row[0])
                seq = row[0]
                if seq in seen:
                    raise errors.InvalidParameter(f"seq_id {seq} appears twice in one step")
                _fill_tokens(row[1], toks, self.n_vocab, f"tokens of seq {seq}")
                k = <int32_t>toks.size()
                if k == 0:
                    raise errors.EmptyPrompt(f"the row for seq {seq} holds no tokens")
                if total + k > self.n_batch:
                    raise errors.BatchOverflow(
                        f"step holds {total + k} tokens or more, over n_batch={self.n_batch}")
                pos0 = L.llama_memory_seq_pos_max(self._mem, seq) + 1
                if pos0 + k > self.n_ctx_seq:
                    raise errors.ContextOverflow(
                        f"seq {seq} holds {pos0} positions; {k} more exceed its context of {self.n_ctx_seq}")
                for j in range(k):
                    b.token[total + j] = toks[j]
                    b.pos[total + j] = pos0 + j
                    b.n_seq_id[total + j] = 1
                    b.seq_id[total + j][0] = seq
                    b.logits[total + j] = 0
                want = row[2] if len(row) == 3 else True
                if want:
                    b.logits[total + k - 1] = 1
                    logits_rows.append((seq, total + k - 1))
                self._step_pos0[seq] = pos0
                seen.append(seq)
                total += k
            if total == 0:
                return []
            b.n_tokens = total
            self._out_idx.assign(self.n_seq_max, -1)
            cpp_error = None
            try:
                with nogil:
                    rc = L.llama_decode(self._ptr, b[0])
            except Exception as exc:
                rc = -1000
                cpp_error = exc
            if rc != 0:
                for s in seen:
                    L.llama_memory_seq_rm(self._mem, s, self._step_pos0[s], -1)
                if rc == 2:
                    raise errors.Aborted(f"decode of {total} tokens was aborted (seqs {seen})")
                if rc == 1:
                    raise errors.ContextOverflow(f"no KV slot for {total} tokens (seqs {seen})")
                lines = recent_log_lines()
                detail = str(cpp_error) if rc == -1000 else (lines[-1] if lines else "no log output")
                raise errors.DecodeFailed(f"llama_decode returned {rc} for {total} tokens (seqs {seen}): {detail}")
            for s, idx in logits_rows:
                self._out_idx[s] = idx
            return [s for s, _ in logits_rows]

    cdef int32_t _logits_index(self, int seq) except -2:
        self._ensure_alive()
        self._check_seq(seq)
        if self._out_idx[seq] < 0:
            raise errors.NoLogits(f"seq {seq} produced no logits in the last step")
        return self._out_idx[seq]

    def has_logits(self, seq_id):
        """True when the last step produced logits for ``seq_id``."""
        with self._lock:
            self._ensure_alive()
            self._check_seq(seq_id)
            return self._out_idx[seq_id] >= 0

    def logits(self, seq_id, out=None):
        """Copy the last-token logits of ``seq_id`` (float32, ``n_vocab``) into a new array or ``out``."""
        cdef float[::1] dst
        cdef const float * src
        cdef int32_t idx
        if out is None:
            out = np.empty(self.n_vocab, dtype=np.float32)
        dst = out
        if dst.shape[0] != self.n_vocab:
            raise errors.InvalidParameter(f"out holds {dst.shape[0]} floats, expected n_vocab={self.n_vocab}")
        with self._lock:
            idx = self._logits_index(seq_id)
            src = L.llama_get_logits_ith(self._ptr, idx)
            if src == NULL:
                raise errors.NoLogits(f"llama.cpp has no logits for seq {seq_id}")
            memcpy(&dst[0], src, self.n_vocab * sizeof(float))
        return out

    # ---- per-sequence state ----------------------------------------------------------------

    def state_size(self, seq_id):
        """Bytes needed to save the state of ``seq_id``."""
        with self._lock:
            self._ensure_alive()
            self._check_seq(seq_id)
            return L.llama_state_seq_get_size(self._ptr, seq_id)

    def state_get(self, seq_id, out=None):
        """Save the KV state of ``seq_id``: a new ``bytes``, or into writable buffer ``out``
        (returns the byte count written)."""
        cdef unsigned char[::1] dst
        cdef size_t need, got
        cdef bytes blob
        cdef uint8_t * cblob
        cdef int seq
        with self._lock, _NativeErrors("state_get"):
            self._ensure_alive()
            self._check_seq(seq_id)
            seq = seq_id
            with nogil:
                need = L.llama_state_seq_get_size(self._ptr, seq)
            if out is None:
                blob = PyBytes_FromStringAndSize(NULL, need)
                cblob = <uint8_t *>PyBytes_AS_STRING(blob)
                with nogil:
                    got = L.llama_state_seq_get_data(self._ptr, cblob, need, seq)
                if got != need:
                    raise errors.StateError(f"llama.cpp wrote {got} of {need} state bytes for seq {seq}")
                return blob
            dst = memoryview(out).cast("B")
            if <size_t>dst.shape[0] < need:
                raise errors.InvalidParameter(f"out holds {dst.shape[0]} bytes; seq {seq} needs {need}")
            if need == 0:
                return 0
            with nogil:
                got = L.llama_state_seq_get_data(self._ptr, <uint8_t *>&dst[0], need, seq)
            if got != need:
                raise errors.StateError(f"llama.cpp wrote {got} of {need} state bytes for seq {seq}")
            return got

    def state_get_parked(self, seq_id):
        """The state of ``seq_id`` as new ``bytes``, copied *without* holding the context
        lock: decodes of other sequences run meanwhile (a model actor hands a save's copy to
        a writer thread this way). Only for a sequence no decode touches (a spare sequence):
        until it returns, the sequence refuses every change (``InvalidParameter``),
        :meth:`clear` and :meth:`free` wait for it.

        Why this is safe in the pinned llama.cpp: a decode only writes cells it allocates
        (empty ones) and its own sequences' cell metadata; the sequence's cells stay
        occupied, so their bytes and positions do not change, and KV buffers are never
        reallocated. The scheduler is synchronized once under the lock; the copy itself
        skips llama_state_seq_get_data's synchronize, which would race with a decode.
        """
        cdef L.llama_context * ptr
        cdef size_t need = 0, got = 0
        cdef bytes blob
        cdef uint8_t * cblob
        cdef int seq
        with self._lock:
            self._ensure_alive()
            self._check_writable(seq_id)
            seq = seq_id
            with nogil:
                L.llama_synchronize(self._ptr)
            ptr = self._ptr
            self._parked[seq] = 1
        try:
            with nogil:
                need = L.erl_state_seq_size_nosync(ptr, seq)
            blob = PyBytes_FromStringAndSize(NULL, need)
            cblob = <uint8_t *>PyBytes_AS_STRING(blob)
            with nogil:
                got = L.erl_state_seq_get_nosync(ptr, cblob, need, seq)
        finally:
            with self._lock:
                del self._parked[seq]
                self._parked_cv.notify_all()
        if need == 0 or got != need:
            raise errors.StateError(f"llama.cpp wrote {got} of {need} state bytes for parked seq {seq}")
        return blob

    def state_set(self, seq_id, data):
        """Replace the KV state of ``seq_id`` with a blob from :meth:`state_get` (bytes-like).

        Returns the number of positions restored. A blob llama.cpp rejects raises
        ``StateError`` and leaves the sequence empty.
        """
        cdef const unsigned char[::1] src = memoryview(data).cast("B")
        cdef size_t n = src.shape[0], used
        cdef int seq
        with self._lock:
            self._ensure_alive()
            self._check_writable(seq_id)
            seq = seq_id
            if n == 0:
                raise errors.StateError(f"empty state blob for seq {seq}")
            self._out_idx[seq] = -1
            L.llama_memory_seq_rm(self._mem, seq, -1, -1)
            L.erl_log_clear_recent()
            try:
                with nogil:
                    used = L.llama_state_seq_set_data(self._ptr, <const uint8_t *>&src[0], n, seq)
            except Exception as exc:
                used = 0
            if used == 0:
                L.llama_memory_seq_rm(self._mem, seq, -1, -1)
                lines = recent_log_lines()
                raise errors.StateError(
                    f"llama.cpp rejected a {n}-byte state blob for seq {seq}: {lines[-1] if lines else 'no detail'}")
            return L.llama_memory_seq_pos_max(self._mem, seq) + 1

    # ---- embeddings ------------------------------------------------------------------------

    def embed(self, tokens, int seq_id=0, bint normalize=True):
        """Embedding of ``tokens`` (float32, ``n_embd``): pooled by the model's pooling type,
        or the last token's hidden state when the model pools nothing. Needs ``embeddings=True``."""
        cdef vector[L.llama_token] toks
        cdef int32_t k, j, rc
        cdef const float * src
        cdef float[::1] dst
        cdef L.llama_batch * b = &self._batch
        cdef int n_embd = self.model.n_embd
        if not self.embeddings:
            raise errors.NotSupported("this context was not created with embeddings=True")
        _fill_tokens(tokens, toks, self.n_vocab, "tokens")
        k = <int32_t>toks.size()
        if k == 0:
            raise errors.EmptyPrompt("cannot embed an empty token list")
        with self._lock, _NativeErrors("embed"):
            self._ensure_alive()
            self._check_seq(seq_id)
            if k > self.n_batch:
                raise errors.BatchOverflow(f"{k} tokens exceed n_batch={self.n_batch}")
            if k > self.n_ctx_seq:
                raise errors.ContextOverflow(f"{k} tokens exceed the sequence context of {self.n_ctx_seq}")
            L.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
            for j in range(k):
                b.token[j] = toks[j]
                b.pos[j] = j
                b.n_seq_id[j] = 1
                b.seq_id[j][0] = seq_id
                b.logits[j] = 1
            b.n_tokens = k
            self._out_idx.assign(self.n_seq_max, -1)
            try:
                with nogil:
                    rc = L.llama_decode(self._ptr, b[0])
                if rc != 0:
                    raise errors.DecodeFailed(f"llama_decode returned {rc} while embedding {k} tokens")
                src = L.llama_get_embeddings_seq(self._ptr, seq_id)
                if src == NULL:
                    src = L.llama_get_embeddings_ith(self._ptr, k - 1)
                if src == NULL:
                    raise errors.NotSupported("llama.cpp produced no embeddings for this model")
                out = np.empty(n_embd, dtype=np.float32)
                dst = out
                memcpy(&dst[0], src, n_embd * sizeof(float))
            finally:
                L.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
        if normalize:
            norm = float(np.sqrt(np.dot(out.astype(np.float64), out.astype(np.float64))))
            if norm > 0.0:
                out /= np.float32(norm)
        return out

    # ---- adapters --------------------------------------------------------------------------

    def set_adapters(self, adapters):
        """Make ``adapters`` (an iterable of ``(Adapter, scale)``) the active LoRA set; ``[]`` clears."""
        cdef vector[L.llama_adapter_lora *] ptrs
        cdef vector[float] scales
        cdef int32_t rc
        pairs = []
        for item in adapters:
            if not isinstance(item, tuple) or len(item) != 2 or not isinstance(item[0], Adapter):
                raise errors.InvalidParameter(f"adapters must hold (Adapter, scale) pairs, got {item!r:.80}")
            scale = item[1]
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not isfinite(scale):
                raise errors.InvalidParameter(f"adapter scale must be a finite number, got {scale!r}")
            pairs.append((item[0], float(scale)))
        with self._lock:
            self._ensure_alive()
            for a, s in pairs:
                (<Adapter>a)._ensure_alive()
                if (<Adapter>a).model is not self.model:
                    raise errors.InvalidParameter(f"adapter {(<Adapter>a).path!r} belongs to another model")
                ptrs.push_back((<Adapter>a)._ptr)
                scales.push_back(s)
            rc = L.llama_set_adapters_lora(self._ptr, ptrs.data() if ptrs.size() else NULL,
                                           ptrs.size(), scales.data() if scales.size() else NULL)
            if rc != 0:
                raise errors.LoadFailed(f"llama.cpp refused the adapter set (code {rc})")
            for a, _ in pairs:
                (<Adapter>a)._use()
            for a in self._adapters:
                (<Adapter>a)._unuse()
            self._adapters = [a for a, _ in pairs]

    def __repr__(self):
        return (f"<erllama Context n_ctx={self.n_ctx} n_seq_max={self.n_seq_max} n_batch={self.n_batch}"
                f"{'' if self._ptr != NULL else ' freed'}>")
