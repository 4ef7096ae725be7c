"""An OpenAI-compatible HTTP server over the running application (the ``server`` extra:
``pip install 'erllama[server]'``): ``create_app(...)`` is an ASGI application to mount in
your own service, ``erllama serve`` runs one under uvicorn. See ``docs/guides/server.md``."""

from __future__ import annotations

from erllama.server.app import ModelSpec, ServerConfig, create_app

__all__ = ["ModelSpec", "ServerConfig", "create_app"]
