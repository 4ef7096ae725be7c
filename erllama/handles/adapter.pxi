# Adapter: a LoRA adapter loaded for a model.


@cython.no_gc_clear
cdef class Adapter:
    """A LoRA adapter. Load with :meth:`Adapter.load`; activate with ``Context.set_adapters``.

    Freeing an adapter that a context still uses is deferred until the context drops it.
    """

    cdef L.llama_adapter_lora * _ptr
    cdef readonly Model model
    cdef readonly str path
    cdef object _lock
    cdef int _users
    cdef bint _release_pending

    def __cinit__(self):
        self._ptr = NULL
        self._users = 0
        self._release_pending = False
        self._lock = threading.RLock()

    def __init__(self, *args, **kwargs):
        raise TypeError("Adapter is not instantiated directly; use Adapter.load(model, path)")

    @staticmethod
    def load(Model model, path):
        """Load a LoRA GGUF for ``model``. Bad files raise ``MalformedGGUF`` or ``LoadFailed``."""
        cdef Adapter self = Adapter.__new__(Adapter)
        cdef bytes bpath = _fs_path(path, "adapter path")
        cdef const char * cpath = bpath
        cdef L.llama_adapter_lora * ptr
        model._attach()
        try:
            if model.vocab_only:
                raise errors.NotSupported(f"model {model.path!r} was loaded vocab_only; it has no weights")
            L.erl_log_clear_recent()
            with nogil:
                ptr = L.llama_adapter_lora_init(model._ptr, cpath)
            if ptr == NULL:
                raise classify_load_failure(os.fsdecode(bpath), recent_log_records(), what="LoRA adapter")
        except BaseException:
            model._detach()
            raise
        self._ptr = ptr
        self.model = model
        self.path = os.fsdecode(bpath)
        _live_add("Adapter", 1)
        return self

    cdef int _ensure_alive(self) except -1:
        if self._ptr == NULL or self._release_pending:
            raise errors.Released(f"adapter {self.path!r} was freed")
        return 0

    cdef void _use(self):
        with self._lock:
            self._users += 1

    cdef void _unuse(self):
        with self._lock:
            self._users -= 1
            if self._users == 0 and self._release_pending:
                self._do_free()

    cdef void _do_free(self):
        cdef L.llama_adapter_lora * ptr = self._ptr
        self._ptr = NULL
        if ptr == NULL:
            return
        try:
            with nogil:
                L.llama_adapter_lora_free(ptr)
        except Exception:
            pass
        _live_add("Adapter", -1)
        self.model._detach()

    def free(self):
        """Free the adapter: ``"freed"``, ``"deferred"`` (a context uses it) or ``"already"``."""
        with self._lock:
            if self._ptr == NULL:
                return "already"
            if self._users > 0:
                self._release_pending = True
                return "deferred"
            self._do_free()
            return "freed"

    @property
    def alive(self):
        """True until the adapter is freed (a pending free counts as not usable but alive)."""
        return self._ptr != NULL

    def __dealloc__(self):
        if self._ptr != NULL:
            warnings.warn(f"unfreed erllama Adapter {self.path!r}", ResourceWarning)
            self._do_free()

    def __repr__(self):
        return f"<erllama Adapter {self.path!r}{'' if self._ptr != NULL else ' freed'}>"
