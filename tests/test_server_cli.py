"""``erllama serve`` as a user runs it: a real process on 127.0.0.1, a TOML file, the real
``openai`` client, SIGTERM to stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import openai
import pytest

from erllama import errors
from erllama.server.config import load_toml, model_arg

from server_helpers import free_port
from supervision_helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent


def test_model_arguments_and_the_toml_file(tmp_path, monkeypatch):
    assert model_arg("/m/a.gguf:alpha").model_id == "alpha" and model_arg("/m/a.gguf").model_id is None
    odd = tmp_path / "a:b.gguf"
    odd.write_bytes(b"")
    assert model_arg(str(odd)).path == str(odd)  # a ':' of an existing path is the path's
    toml = tmp_path / "serve.toml"
    toml.write_text(textwrap.dedent("""
        [server]
        port = 9001
        api_key_env = "MY_KEY"
        max_queue = 3
        [app]
        cache_dir = "/tmp/x"
        [[models]]
        path = "/m/g.gguf"
        id = "g"
        n_ctx = 2048
    """))
    monkeypatch.setenv("MY_KEY", "k1")
    cfg, listen = load_toml(toml)
    assert listen == ("127.0.0.1", 9001) and cfg.api_key == "k1" and cfg.max_queue == 3
    assert cfg.models[0].model_id == "g" and cfg.models[0].options == {"n_ctx": 2048}
    assert cfg.app_config == {"cache_dir": "/tmp/x"}
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(errors.ConfigError, match="MY_KEY"):
        load_toml(toml)
    toml.write_text("[server]\nprot = 1\n")
    with pytest.raises(errors.ConfigError, match="prot"):
        load_toml(toml)
    toml.write_text("not toml [")
    with pytest.raises(errors.ConfigError, match="serve.toml"):
        load_toml(toml)


def test_erllama_serve_runs_answers_and_stops_on_sigterm(tmp_path, tiny_chatml_path):
    port = free_port()
    env = {**os.environ, "ERLLAMA_API_KEY": "k2"}
    proc = subprocess.Popen([sys.executable, "-m", "erllama.cli", "-v", "serve", f"{tiny_chatml_path}:tiny", "--port",
                             str(port), "--n-ctx", "512", "--isolation", "none", "--cache-dir", str(tmp_path / "c")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def ready():
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(base + "/health", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 60, "erllama serve to be ready")
        client = openai.OpenAI(base_url=base + "/v1", api_key="k2", max_retries=0, timeout=30)
        got = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=4, temperature=0)
        assert got.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="bad", max_retries=0).models.list()
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then exits by the signal it caught (its documented behaviour)
        assert proc.wait(30) in (0, -signal.SIGTERM)
        out = proc.stdout.read()
        assert f"on http://127.0.0.1:{port}/v1 (API key required)" in out, out
        assert "erllama server stopped (and its application)" in out, out[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
