# Backend initialisation and the llama.cpp log -> Python logging bridge.

llama_logger = logging.getLogger("erllama.llama")

_PY_LEVELS = {
    L.GGML_LOG_LEVEL_DEBUG: logging.DEBUG,
    L.GGML_LOG_LEVEL_INFO: logging.INFO,
    L.GGML_LOG_LEVEL_WARN: logging.WARNING,
    L.GGML_LOG_LEVEL_ERROR: logging.ERROR,
}

cdef bint _backend_ready = False
_backend_lock = threading.Lock()


cdef void _emit_log(int level, const char * line, size_t n) noexcept with gil:
    try:
        llama_logger.log(_PY_LEVELS.get(level, logging.INFO), "%s", line[:n].decode("utf-8", "replace"))
    except BaseException:
        pass


def set_log_level(level=None):
    """Route llama.cpp log lines at or above ``level`` (a :mod:`logging` level) to Python.

    With no argument, the effective level of the ``erllama.llama`` logger is used. Lines
    below the level never take the GIL. Warnings and errors are always kept per thread
    (see :func:`recent_log_lines`) whatever the level.
    """
    if level is None:
        level = llama_logger.getEffectiveLevel()
    level = int(level)
    if level <= logging.DEBUG:
        ggml = L.GGML_LOG_LEVEL_DEBUG
    elif level <= logging.INFO:
        ggml = L.GGML_LOG_LEVEL_INFO
    elif level <= logging.WARNING:
        ggml = L.GGML_LOG_LEVEL_WARN
    elif level <= logging.ERROR:
        ggml = L.GGML_LOG_LEVEL_ERROR
    else:
        ggml = 99
    L.erl_log_set_min_level(ggml)


def recent_log_records():
    """The last warning and error lines llama.cpp logged on the calling thread, oldest first,
    as ``(logging level, line)`` pairs."""
    return [(_PY_LEVELS.get(s[0] - 48, logging.ERROR), s[1:].decode("utf-8", "replace"))
            for s in L.erl_log_recent()]


def recent_log_lines():
    """The last warning and error lines llama.cpp logged on the calling thread (oldest first)."""
    return [line for _, line in recent_log_records()]


def clear_log_lines():
    """Forget the warning and error lines kept for the calling thread."""
    L.erl_log_clear_recent()


def _detach_log():
    L.erl_log_set_emit(NULL)


def backend_init():
    """Initialise the llama.cpp backend once per process, with its log routed to Python."""
    global _backend_ready
    if _backend_ready:
        return
    with _backend_lock:
        if _backend_ready:
            return
        L.erl_log_set_emit(_emit_log)
        set_log_level()
        L.llama_log_set(L.erl_log_callback, NULL)
        with nogil:
            L.llama_backend_init()
        atexit.register(_detach_log)
        _backend_ready = True


def system_info():
    """llama.cpp's description of the CPU features and backends compiled in."""
    backend_init()
    return (<bytes>L.llama_print_system_info()).decode("utf-8", "replace")


cdef extern from "erl_buildinfo.h":
    const char *ERL_BUILD_INFO


def build_info():
    """The facts setup.py recorded when it built this extension, as a JSON string: the
    llama.cpp source id, the CMake arguments, the build-cache key and directory, whether AMX
    was requested, the compiler and the CPU it was built on."""
    return (<bytes>ERL_BUILD_INFO).decode("utf-8", "replace")


def max_parallel_sequences():
    """The largest ``n_seq_max`` a context accepts."""
    return L.llama_max_parallel_sequences()


def device_memory():
    """Free and total memory of every non-CPU device, as a list of dicts (empty on a CPU build)."""
    cdef size_t i, n, free_b = 0, total_b = 0
    cdef L.ggml_backend_dev_t dev
    backend_init()
    out = []
    n = L.ggml_backend_dev_count()
    for i in range(n):
        dev = L.ggml_backend_dev_get(i)
        kind = L.ggml_backend_dev_get_type(dev)
        if kind == L.GGML_BACKEND_DEVICE_TYPE_CPU:
            continue
        L.ggml_backend_dev_memory(dev, &free_b, &total_b)
        out.append({
            "name": (<bytes>L.ggml_backend_dev_name(dev)).decode("utf-8", "replace"),
            "description": (<bytes>L.ggml_backend_dev_description(dev)).decode("utf-8", "replace"),
            "type": {L.GGML_BACKEND_DEVICE_TYPE_GPU: "gpu", L.GGML_BACKEND_DEVICE_TYPE_IGPU: "igpu"}.get(kind, "accel"),
            "free": free_b,
            "total": total_b,
        })
    return out


def _inject_log(int level, text):
    """Feed a fragment to the log callback as llama.cpp would (for tests of line assembly)."""
    cdef bytes b = text.encode("utf-8")
    L.erl_log_callback(<L.ggml_log_level>level, b, NULL)
