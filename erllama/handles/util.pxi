# Shared helpers: live-object counters, token conversion, paths, CRC32C, load-failure
# classification.

import re
from operator import index as _index

cdef dict _live = {"Model": 0, "Context": 0, "Sampler": 0, "Adapter": 0}
_live_lock = threading.Lock()

cdef Py_ssize_t MAX_TOKENS = 1 << 24        # a prompt longer than this is an error, not an allocation
cdef Py_ssize_t MAX_TEXT_BYTES = 1 << 28    # llama_tokenize takes an int32 length
cdef Py_ssize_t NOGIL_TEXT_BYTES = 4096


cdef inline void _live_add(str kind, int delta):
    with _live_lock:
        _live[kind] += delta


def live_objects():
    """How many native wrappers of each kind hold a live llama.cpp pointer (for leak checks)."""
    with _live_lock:
        return dict(_live)


cdef int _fill_tokens(object tokens, vector[L.llama_token] & out, int32_t n_vocab, str what) except -1:
    """Copy a sequence of token ids into ``out``, checking each against the vocabulary."""
    cdef Py_ssize_t i = 0
    cdef long long t
    out.clear()
    try:
        n = len(tokens)
    except TypeError:
        raise errors.InvalidToken(f"{what} must be a sequence of token ids, got {type(tokens).__name__}") from None
    if n > MAX_TOKENS:
        raise errors.ContextOverflow(f"{what} holds {n} tokens, more than the limit of {MAX_TOKENS}")
    out.reserve(n)
    for tok in tokens:
        try:
            t = tok if type(tok) is int else _index(tok)
        except (TypeError, OverflowError):
            raise errors.InvalidToken(
                f"{what}[{i}] = {tok!r} is not a token id (an int in [0, {n_vocab}))") from None
        if t < 0 or t >= n_vocab:
            raise errors.InvalidToken(f"{what}[{i}] = {t} is outside the vocabulary [0, {n_vocab})")
        out.push_back(<L.llama_token>t)
        i += 1
    return 0


cdef bytes _fs_path(object path, str what):
    try:
        b = os.fsencode(path)
    except TypeError:
        raise errors.InvalidParameter(f"{what} must be a path (str or os.PathLike), got {type(path).__name__}") from None
    if not b or b"\0" in b or len(b) > 4096:
        raise errors.InvalidParameter(f"{what} {path!r} is empty, too long or contains NUL")
    st = os.stat(b)   # FileNotFoundError / PermissionError propagate as they are
    if not stat.S_ISREG(st.st_mode):
        raise errors.MalformedGGUF(f"{what} {os.fsdecode(b)!r} is not a regular file")
    if not os.access(b, os.R_OK):
        raise PermissionError(errno.EACCES, f"{what} is not readable", os.fsdecode(b))
    return b


def crc32c(data, unsigned int crc=0):
    """CRC32C (Castagnoli) of a bytes-like object; pass a previous result as ``crc`` to continue."""
    cdef const unsigned char[::1] view = memoryview(data).cast("B")
    cdef size_t n = view.shape[0]
    cdef const unsigned char * p = &view[0] if n else NULL
    cdef uint32_t r
    if n > 65536:
        with nogil:
            r = L.erl_crc32c(crc, p, n)
    else:
        r = L.erl_crc32c(crc, p, n)
    return r


_IO_WORDS = ("permission denied", "no such file", "input/output error", "is a directory",
             "too many open files", "read-only file system", "failed to open")
_MEMORY_WORDS = ("out of memory", "unable to allocate", "cannot allocate", "bad_alloc", "mmap failed",
                 "failed to mmap", "mlock failed", "failed to allocate buffer of size",
                 "failed to allocate cpu buffer")
_MALFORMED_WORDS = ("gguf", "magic", "key-value", "tensor", "vocab", "architecture", "arch ", "hparam",
                    "failed to read", "file bounds", "wrong", "missing", "invalid", "unknown",
                    "unsupported", "corrupt", "key not found", "shape", "version", "alignment",
                    "overflow", "out of range", "too many", "n_dims", "type", "mismatch", "lora")
# a rank-0 LoRA "fails to allocate" a zero-size buffer: that is a bad file, not memory
_ALLOC_FAILURE = re.compile(r"failed to allocate (?!buffer for lora)")
_GENERIC_FAILURES = re.compile(
    r"(llama_model_load_from_file_impl: failed to load model$|"
    r"error loading model: llama_model_loader: failed to load model from |"
    r"failed to load adapter$|llama_adapter_lora_init: failed to apply lora adapter:?$)")


def classify_load_failure(path, lines, what="model"):
    """Turn the llama.cpp log lines of a failed load into ``MalformedGGUF`` or ``LoadFailed``.

    ``lines`` are strings or ``(level, line)`` pairs (see :func:`recent_log_records`).
    I/O, allocation and mapping failures are ``LoadFailed``; a loader complaint about the
    file's format or contents is ``MalformedGGUF``; anything else is ``LoadFailed``. The
    path is removed from the lines before matching (a directory named ``mlock`` must not
    change the verdict), and the message carries the specific error lines, not only
    llama.cpp's generic "failed to load".
    """
    records = [ln if isinstance(ln, tuple) else (logging.ERROR, ln) for ln in lines]
    records = [(lvl, ln.strip()) for lvl, ln in records if ln and ln.strip()]
    errs = [ln for lvl, ln in records if lvl >= logging.ERROR] or [ln for _, ln in records]
    specific = [ln for ln in errs if not _GENERIC_FAILURES.search(ln)]
    detail = "; ".join(specific[:3]) or (errs[-1] if errs else "no log output")
    text = " ".join(specific).replace(str(path), "<path>").lower()
    if any(w in text for w in _IO_WORDS) or any(w in text for w in _MEMORY_WORDS) \
            or _ALLOC_FAILURE.search(text):
        return errors.LoadFailed(f"failed to load {what} {path!r}: {detail}")
    if any(w in text for w in _MALFORMED_WORDS):
        return errors.MalformedGGUF(f"{path!r} is not a valid GGUF {what}: {detail}")
    return errors.LoadFailed(f"failed to load {what} {path!r}: {detail}")


@cython.final
cdef class _NativeErrors:
    """Context manager: a C++ exception that crossed a llama.cpp call (converted by Cython to a
    builtin exception) becomes ``errors.NativeError`` naming the operation."""

    cdef str what

    def __cinit__(self, str what):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, t, v, tb):
        if v is not None and isinstance(v, Exception) and not isinstance(v, errors.ErllamaError):
            raise errors.NativeError(f"llama.cpp failed in {self.what}: {type(v).__name__}: {v}") from v
        return False


cdef inline int _check_int(object value, str name, long long lo, long long hi) except -1:
    if isinstance(value, bool) or not isinstance(value, int) or not (lo <= value <= hi):
        raise errors.InvalidParameter(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    return 0


cdef inline int _check_choice(object value, str name, dict choices) except -1:
    try:
        ok = value in choices
    except TypeError:
        ok = False
    if not ok:
        raise errors.InvalidParameter(f"{name} must be one of {sorted(map(str, choices))}, got {value!r}")
    return 0


_DEVICE_TYPES = {L.GGML_BACKEND_DEVICE_TYPE_CPU: "cpu", L.GGML_BACKEND_DEVICE_TYPE_GPU: "gpu",
                 L.GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu", L.GGML_BACKEND_DEVICE_TYPE_ACCEL: "accel"}


def backends():
    """The names of the ggml backends compiled in and registered (``["CPU"]``, ``["CUDA", "CPU"]``)."""
    cdef size_t i
    backend_init()
    return [(<bytes>L.ggml_backend_reg_name(L.ggml_backend_reg_get(i))).decode("utf-8", "replace")
            for i in range(L.ggml_backend_reg_count())]


def devices():
    """Every ggml device, the CPU included, as a list of dicts: ``name``, ``description``,
    ``type`` (cpu/gpu/igpu/accel), ``backend`` (its backend's name), ``free`` and ``total``
    memory in bytes (for the CPU device, the host's as ggml reports it)."""
    cdef size_t i, free_b, total_b
    cdef L.ggml_backend_dev_t dev
    backend_init()
    out = []
    for i in range(L.ggml_backend_dev_count()):
        dev = L.ggml_backend_dev_get(i)
        free_b = total_b = 0
        L.ggml_backend_dev_memory(dev, &free_b, &total_b)
        out.append({
            "name": (<bytes>L.ggml_backend_dev_name(dev)).decode("utf-8", "replace"),
            "description": (<bytes>L.ggml_backend_dev_description(dev)).decode("utf-8", "replace"),
            "type": _DEVICE_TYPES.get(L.ggml_backend_dev_get_type(dev), "unknown"),
            "backend": (<bytes>L.ggml_backend_reg_name(L.ggml_backend_dev_backend_reg(dev))).decode("utf-8", "replace"),
            "free": free_b,
            "total": total_b,
        })
    return out
