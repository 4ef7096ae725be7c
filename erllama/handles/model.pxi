# Model: a loaded GGUF, its vocabulary and metadata.

LOAD_MODES = {
    "auto": L.LLAMA_LOAD_MODE_AUTO, "none": L.LLAMA_LOAD_MODE_NONE, "mmap": L.LLAMA_LOAD_MODE_MMAP,
    "mlock": L.LLAMA_LOAD_MODE_MLOCK, "mmap_mlock": L.LLAMA_LOAD_MODE_MMAP_MLOCK,
    "direct_io": L.LLAMA_LOAD_MODE_DIRECT_IO,
}
SPLIT_MODES = {
    "none": L.LLAMA_SPLIT_MODE_NONE, "layer": L.LLAMA_SPLIT_MODE_LAYER,
    "row": L.LLAMA_SPLIT_MODE_ROW, "tensor": L.LLAMA_SPLIT_MODE_TENSOR,
}


cdef str _cstr(const char * s):
    return None if s == NULL else (<bytes>s).decode("utf-8", "replace")


@cython.no_gc_clear
cdef class Model:
    """A llama.cpp model. Create with :meth:`Model.load`; free with :meth:`free`.

    The model's free is deferred while contexts, samplers or adapters made from it live;
    once a free is pending, new children, tokenization and templating raise ``Released``.
    """

    cdef L.llama_model * _ptr
    cdef const L.llama_vocab * _vocab
    cdef object _lock
    cdef int _children
    cdef bint _release_pending
    cdef float * _tensor_split
    cdef readonly str path
    cdef readonly int n_vocab
    cdef readonly int n_embd
    cdef readonly int n_layer
    cdef readonly int n_head
    cdef readonly int n_head_kv
    cdef readonly int n_ctx_train
    cdef readonly int n_swa
    cdef readonly bint vocab_only

    def __cinit__(self):
        self._ptr = NULL
        self._vocab = NULL
        self._tensor_split = NULL
        self._children = 0
        self._release_pending = False
        self._lock = threading.RLock()

    def __init__(self, *args, **kwargs):
        raise TypeError("Model is not instantiated directly; use Model.load(path, ...)")

    @staticmethod
    def load(path, *, int n_gpu_layers=0, str load_mode="auto", bint vocab_only=False,
             str split_mode="layer", int main_gpu=0, tensor_split=None, bint check_tensors=False):
        """Load a GGUF model.

        Raises ``FileNotFoundError`` for a missing path, ``MalformedGGUF`` when the file is
        not a valid GGUF (or not a regular file), ``LoadFailed`` for anything else (out of
        memory, I/O), ``InvalidParameter`` for a bad option.
        """
        cdef Model self = Model.__new__(Model)
        cdef bytes bpath
        cdef const char * cpath
        cdef L.llama_model_params params = L.llama_model_default_params()
        cdef L.llama_model * ptr
        cdef size_t i, ndev
        _check_choice(load_mode, "load_mode", LOAD_MODES)
        _check_choice(split_mode, "split_mode", SPLIT_MODES)
        bpath = _fs_path(path, "model path")
        params.n_gpu_layers = n_gpu_layers
        params.load_mode = LOAD_MODES[load_mode]
        params.split_mode = SPLIT_MODES[split_mode]
        params.main_gpu = main_gpu
        params.vocab_only = vocab_only
        params.check_tensors = check_tensors
        if tensor_split is not None:
            ndev = L.llama_max_devices()
            values = [float(x) for x in tensor_split]
            if len(values) > ndev or any(not (v >= 0.0 and isfinite(v)) for v in values):
                raise errors.InvalidParameter(
                    f"tensor_split must hold at most {ndev} finite non-negative floats, got {tensor_split!r}")
            # llama.cpp keeps the pointer: the buffer lives as long as the model.
            self._tensor_split = <float *>malloc(ndev * sizeof(float))
            if self._tensor_split == NULL:
                raise MemoryError()
            for i in range(ndev):
                self._tensor_split[i] = values[i] if i < len(values) else 0.0
            params.tensor_split = self._tensor_split
        backend_init()
        cpath = bpath
        L.erl_log_clear_recent()
        with nogil:
            ptr = L.llama_model_load_from_file(cpath, params)
        if ptr == NULL:
            raise classify_load_failure(os.fsdecode(bpath), recent_log_records())
        self._ptr = ptr
        self._vocab = L.llama_model_get_vocab(ptr)
        self.path = os.fsdecode(bpath)
        self.vocab_only = vocab_only
        self.n_vocab = L.llama_vocab_n_tokens(self._vocab)
        self.n_embd = L.llama_model_n_embd(ptr)
        self.n_layer = L.llama_model_n_layer(ptr)
        if self.n_layer > 0:  # per-layer accessors abort on a vocab-only model
            self.n_head = L.llama_model_n_head(ptr)
            self.n_head_kv = L.llama_model_n_head_kv(ptr)
        self.n_ctx_train = L.llama_model_n_ctx_train(ptr)
        self.n_swa = L.llama_model_n_swa(ptr)
        _live_add("Model", 1)
        return self

    cdef int _ensure_alive(self) except -1:
        if self._ptr == NULL:
            raise errors.Released(f"model {self.path!r} was freed")
        return 0

    cdef int _ensure_usable(self) except -1:
        self._ensure_alive()
        if self._release_pending:
            raise errors.Released(f"model {self.path!r} is being freed (waiting for its contexts and adapters)")
        return 0

    cdef int _attach(self) except -1:
        with self._lock:
            self._ensure_usable()
            self._children += 1
        return 0

    cdef void _detach(self):
        with self._lock:
            self._children -= 1
            if self._children == 0 and self._release_pending:
                self._do_free()

    cdef void _do_free(self):
        cdef L.llama_model * ptr = self._ptr
        self._ptr = NULL
        self._vocab = NULL
        if ptr != NULL:
            try:
                with nogil:
                    L.llama_model_free(ptr)
            except Exception:
                pass  # leak rather than risk a double free
            _live_add("Model", -1)
        if self._tensor_split != NULL:
            free(self._tensor_split)
            self._tensor_split = NULL

    def free(self):
        """Free the model. Returns ``"freed"``, ``"deferred"`` (children alive) or ``"already"``."""
        with self._lock:
            if self._ptr == NULL:
                return "already"
            if self._children > 0:
                self._release_pending = True
                return "deferred"
            self._do_free()
            return "freed"

    def __dealloc__(self):
        if self._ptr != NULL:
            warnings.warn(f"unfreed erllama Model {self.path!r}", ResourceWarning)
            self._do_free()
        elif self._tensor_split != NULL:
            free(self._tensor_split)

    @property
    def alive(self):
        """True while the llama.cpp model exists (a pending free still counts as alive)."""
        return self._ptr != NULL

    @property
    def free_pending(self):
        """True when :meth:`free` was deferred because children are alive."""
        return self._release_pending

    @property
    def n_children(self):
        """Number of live contexts, samplers and adapters made from this model."""
        return self._children

    @property
    def size(self):
        """Total bytes of the model's tensors."""
        with self._lock:
            self._ensure_alive()
            return L.llama_model_size(self._ptr)

    @property
    def is_recurrent(self):
        """True for recurrent and hybrid models (Mamba, RWKV, ...), whose memory copies
        sequences by sharing state cells rather than KV cells."""
        with self._lock:
            self._ensure_alive()
            return bool(L.llama_model_is_recurrent(self._ptr) or L.llama_model_is_hybrid(self._ptr))

    @property
    def n_params(self):
        """Number of parameters."""
        with self._lock:
            self._ensure_alive()
            return L.llama_model_n_params(self._ptr)

    @property
    def description(self):
        """llama.cpp's one-line description (architecture, size, quantization)."""
        cdef char buf[256]
        with self._lock:
            self._ensure_alive()
            n = L.llama_model_desc(self._ptr, buf, sizeof(buf))
            return buf[:max(0, min(n, sizeof(buf) - 1))].decode("utf-8", "replace")

    @property
    def ftype(self):
        """The file type (quantization) as llama.cpp's ``llama_ftype`` number."""
        with self._lock:
            self._ensure_alive()
            return <int>L.llama_model_ftype(self._ptr)

    @property
    def ftype_name(self):
        """The file type (quantization) as a name, e.g. ``"Q4_K - Medium"``."""
        with self._lock:
            self._ensure_alive()
            return _cstr(L.llama_ftype_name(L.llama_model_ftype(self._ptr)))

    def meta(self, key):
        """The GGUF metadata value of ``key`` as a string, or ``None`` when absent."""
        cdef bytes bkey = key.encode("utf-8")
        cdef int32_t n
        cdef bytes buf
        with self._lock:
            self._ensure_alive()
            n = L.llama_model_meta_val_str(self._ptr, bkey, NULL, 0)
            if n < 0:
                return None
            buf = PyBytes_FromStringAndSize(NULL, n + 1)
            L.llama_model_meta_val_str(self._ptr, bkey, PyBytes_AS_STRING(buf), n + 1)
            return buf[:n].decode("utf-8", "replace")

    def metadata(self):
        """All GGUF metadata as a ``dict`` of strings (arrays are summarised by llama.cpp)."""
        cdef char kbuf[512]
        cdef int32_t i, n, count
        cdef bytes vbuf
        out = {}
        with self._lock:
            self._ensure_alive()
            count = L.llama_model_meta_count(self._ptr)
            for i in range(count):
                n = L.llama_model_meta_key_by_index(self._ptr, i, kbuf, sizeof(kbuf))
                if n < 0:
                    continue
                key = kbuf[:min(n, sizeof(kbuf) - 1)].decode("utf-8", "replace")
                n = L.llama_model_meta_val_str_by_index(self._ptr, i, NULL, 0)
                if n < 0:
                    continue
                vbuf = PyBytes_FromStringAndSize(NULL, n + 1)
                L.llama_model_meta_val_str_by_index(self._ptr, i, PyBytes_AS_STRING(vbuf), n + 1)
                out[key] = vbuf[:n].decode("utf-8", "replace")
        return out

    def chat_template(self, name=None):
        """The model's chat template (Jinja text), or ``None`` when the GGUF has none."""
        cdef bytes bname
        cdef const char * cname = NULL
        if name is not None:
            bname = name.encode("utf-8")
            cname = bname
        with self._lock:
            self._ensure_alive()
            return _cstr(L.llama_model_chat_template(self._ptr, cname))

    # ---- vocabulary ------------------------------------------------------------------

    def is_eog(self, int token):
        """True when ``token`` ends generation (EOS, EOT, ...)."""
        with self._lock:
            self._ensure_alive()
            self._check_token(token)
            return L.llama_vocab_is_eog(self._vocab, token)

    def is_control(self, int token):
        """True when ``token`` is a control token."""
        with self._lock:
            self._ensure_alive()
            self._check_token(token)
            return L.llama_vocab_is_control(self._vocab, token)

    def token_text(self, int token):
        """The vocabulary entry of ``token`` as stored in the GGUF."""
        with self._lock:
            self._ensure_alive()
            self._check_token(token)
            return _cstr(L.llama_vocab_get_text(self._vocab, token))

    cdef int _check_token(self, long long token) except -1:
        if token < 0 or token >= self.n_vocab:
            raise errors.InvalidToken(f"token id {token} is outside the vocabulary [0, {self.n_vocab})")
        return 0

    @property
    def special_tokens(self):
        """``dict`` of bos/eos/eot/nl token ids (-1 when the model has none) and add_bos/add_eos."""
        with self._lock:
            self._ensure_alive()
            return {
                "bos": L.llama_vocab_bos(self._vocab), "eos": L.llama_vocab_eos(self._vocab),
                "eot": L.llama_vocab_eot(self._vocab), "nl": L.llama_vocab_nl(self._vocab),
                "add_bos": L.llama_vocab_get_add_bos(self._vocab),
                "add_eos": L.llama_vocab_get_add_eos(self._vocab),
            }

    def tokenize(self, text, bint add_special=True, bint parse_special=False):
        """Tokenize ``text`` (str or UTF-8 bytes) into a list of token ids."""
        cdef bytes btext
        cdef const char * ctext
        cdef int32_t n, cap, r
        cdef vector[L.llama_token] buf
        if isinstance(text, str):
            btext = (<str>text).encode("utf-8")
        elif isinstance(text, bytes):
            btext = text
        else:
            raise errors.InvalidParameter(f"text must be str or bytes, got {type(text).__name__}")
        if len(btext) > MAX_TEXT_BYTES:
            raise errors.InvalidParameter(f"text is {len(btext)} bytes, more than the limit of {MAX_TEXT_BYTES}")
        n = len(btext)
        ctext = btext
        cap = n + 8
        with self._lock, _NativeErrors("tokenize"):
            self._ensure_usable()
            for _ in range(2):
                buf.resize(cap)
                if n > NOGIL_TEXT_BYTES:
                    with nogil:
                        r = L.llama_tokenize(self._vocab, ctext, n, buf.data(), cap, add_special, parse_special)
                else:
                    r = L.llama_tokenize(self._vocab, ctext, n, buf.data(), cap, add_special, parse_special)
                if r >= 0:
                    return [buf[i] for i in range(r)]
                if r == -2147483648:
                    break
                cap = -r
        raise errors.InvalidParameter(f"llama.cpp could not tokenize a text of {n} bytes")

    def token_to_piece(self, int token, bint special=False):
        """The bytes ``token`` renders as (possibly a partial UTF-8 sequence)."""
        cdef char small[64]
        cdef int32_t r
        cdef bytes big
        with self._lock, _NativeErrors("token_to_piece"):
            self._ensure_alive()
            self._check_token(token)
            r = L.llama_token_to_piece(self._vocab, token, small, sizeof(small), 0, special)
            if r >= 0:
                return small[:r]
            big = PyBytes_FromStringAndSize(NULL, -r)
            r = L.llama_token_to_piece(self._vocab, token, PyBytes_AS_STRING(big), len(big), 0, special)
            return big[:max(r, 0)]

    def detokenize(self, tokens, bint remove_special=False, bint unparse_special=False):
        """Render token ids as text (invalid UTF-8 is replaced)."""
        cdef vector[L.llama_token] toks
        cdef int32_t r, cap
        cdef bytes out
        cdef char * cout
        _fill_tokens(tokens, toks, self.n_vocab, "tokens")
        if toks.size() == 0:
            return ""
        cap = <int32_t>toks.size() * 8 + 16
        with self._lock, _NativeErrors("detokenize"):
            self._ensure_usable()
            for _ in range(2):
                out = PyBytes_FromStringAndSize(NULL, cap)
                cout = PyBytes_AS_STRING(out)
                with nogil:
                    r = L.llama_detokenize(self._vocab, toks.data(), <int32_t>toks.size(),
                                           cout, cap, remove_special, unparse_special)
                if r >= 0:
                    return out[:r].decode("utf-8", "replace")
                cap = -r
        raise errors.InvalidParameter(f"llama.cpp could not detokenize {toks.size()} tokens")

    def apply_chat_template(self, messages, template=None, bint add_assistant=True):
        """Render ``messages`` with ``template`` (a name such as ``"gemma"`` or Jinja text).

        Without ``template`` the model's own template is used; a model without one raises
        ``NoChatTemplate``.
        """
        if template is None:
            template = self.chat_template()
            if template is None:
                raise errors.NoChatTemplate(
                    f"model {self.path!r} has no chat template; name one (e.g. 'chatml', 'gemma')")
        with self._lock:
            self._ensure_usable()
        return apply_chat_template(template, messages, add_assistant)

    def __repr__(self):
        state = "freed" if self._ptr == NULL else ("free pending" if self._release_pending else "live")
        return f"<erllama Model {self.path!r} n_vocab={self.n_vocab} n_embd={self.n_embd} {state}>"


def builtin_chat_templates():
    """Names of the chat templates llama.cpp knows without Jinja (``chatml``, ``gemma``, ...)."""
    cdef const char * names[128]
    cdef int32_t n = L.llama_chat_builtin_templates(names, 128)
    return [_cstr(names[i]) for i in range(min(n, 128))]


def apply_chat_template(template, messages, bint add_assistant=True):
    """Render chat ``messages`` (dicts with str ``role`` and ``content``) with ``template``.

    ``template`` is a built-in name (see :func:`builtin_chat_templates`) or Jinja text that
    llama.cpp recognises. Non-string roles or contents raise ``InvalidContent``; a template
    llama.cpp cannot apply raises ``TemplateError``.
    """
    cdef vector[L.llama_chat_message] msgs
    cdef L.llama_chat_message m
    cdef int32_t r, cap
    cdef bytes out, btmpl
    if not isinstance(template, str) or not template:
        raise errors.InvalidParameter(f"template must be a non-empty str, got {template!r}")
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise errors.InvalidContent(f"messages must be a list of dicts, got {type(messages).__name__}")
    keep = []
    total = 0
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise errors.InvalidContent(f"messages[{i}] must be a dict, got {type(msg).__name__}")
        role = msg.get("role")
        content = msg.get("content")
        if not isinstance(role, str):
            raise errors.InvalidContent(f"messages[{i}]['role'] must be a str, got {role!r}")
        if not isinstance(content, str):
            raise errors.InvalidContent(
                f"messages[{i}]['content'] must be a str, got {type(content).__name__}: {content!r:.60}")
        brole = role.encode("utf-8")
        bcontent = content.encode("utf-8")
        if b"\0" in brole or b"\0" in bcontent:
            raise errors.InvalidContent(f"messages[{i}] contains a NUL character")
        keep.append((brole, bcontent))
        total += len(brole) + len(bcontent)
    for brole, bcontent in keep:
        m.role = <const char *>brole
        m.content = <const char *>bcontent
        msgs.push_back(m)
    btmpl = template.encode("utf-8")
    cap = <int32_t>(total * 2 + 1024)
    for _ in range(2):
        out = PyBytes_FromStringAndSize(NULL, cap)
        with _NativeErrors("chat template"):
            r = L.llama_chat_apply_template(btmpl, msgs.data(), msgs.size(), add_assistant,
                                            PyBytes_AS_STRING(out), cap)
        if r < 0:
            raise errors.TemplateError(f"llama.cpp cannot apply the chat template {template[:80]!r}")
        if r <= cap:
            return out[:r].decode("utf-8", "replace")
        cap = r + 1
    raise errors.TemplateError(f"chat template {template[:80]!r} output kept growing")
