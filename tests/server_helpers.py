"""A real uvicorn on 127.0.0.1 and a free port, in a thread of the test process, for the
server tests; every wait is bounded."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from erllama.server import ServerConfig, create_app


def free_port() -> int:
    """A port nobody listens on right now (on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(config: ServerConfig | None = None, timeout: float = 60.0, **overrides: Any) -> Iterator[str]:
    """Run ``create_app(config, **overrides)`` under uvicorn; yields its base URL
    (``http://127.0.0.1:<port>``) once it accepts connections, and stops it after."""
    app = create_app(config, **overrides)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive():
            raise AssertionError("uvicorn exited before it started")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise AssertionError(f"uvicorn did not start within {timeout} s")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        if thread.is_alive():
            raise AssertionError("uvicorn did not stop within 30 s")
