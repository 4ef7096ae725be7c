"""AppConfig and ModelConfig: defaults, overrides, and a clear ConfigError for bad values."""

from __future__ import annotations

import pytest

from erllama import errors
from erllama.cache.policy import SavePolicy
from erllama.cache.pressure import PressureConfig
from erllama.config import AppConfig, ModelConfig


def test_app_defaults_and_cache_config(tmp_path, monkeypatch):
    monkeypatch.setenv("ERLLAMA_CACHE_DIR", str(tmp_path / "c"))
    cfg = AppConfig()
    assert cfg.cache_dir == str(tmp_path / "c")
    assert isinstance(cfg.policy, SavePolicy) and isinstance(cfg.pressure, PressureConfig)
    cc = cfg.cache_config()
    assert cc.resolved_disk_dir() == tmp_path / "c" / "kv" and cc.ram_quota == cfg.ram_quota
    built = AppConfig.build(cfg, ram_quota=5, policy={"min_tokens": 0, "cold_min_tokens": 0},
                            pressure={"enabled": True, "high": 0.9})
    assert built.ram_quota == 5 and built.policy.min_tokens == 0 and built.pressure.enabled


@pytest.mark.parametrize("kwargs, field", [
    ({"ram_quota": -1}, "ram_quota"), ({"disk_quota": 1.5}, "disk_quota"),
    ({"writer_max_concurrent": 0}, "writer_max_concurrent"), ({"model_period": 0}, "model_period"),
    ({"policy": {"min_tokens": -3}}, "min_tokens"), ({"policy": {"bogus": 1}}, "bogus"),
    ({"pressure": {"high": 2.0}}, "high"), ({"pressure": {"nope": 1}}, "nope"), ({"cache_dir": ""}, "cache_dir"),
    ({"not_an_option": 1}, "not_an_option"),
])
def test_app_bad_values(kwargs, field):
    with pytest.raises(errors.ConfigError, match=field):
        AppConfig.build(**kwargs)


def test_model_defaults_and_context_params():
    cfg = ModelConfig.build(n_seq_max=4, n_batch=256, n_ubatch=1024)
    assert cfg.n_ubatch == 256  # clamped to n_batch
    params = cfg.context_params()
    assert params["n_seq_max"] == 4 and "kv_unified" in params and params["type_k"] == "f16"
    assert ModelConfig(fingerprint=b"x" * 32).fingerprint == b"x" * 32


@pytest.mark.parametrize("kwargs, field", [
    ({"n_ctx": 0}, "n_ctx"), ({"n_seq_max": 300}, "n_seq_max"), ({"n_batch": "512"}, "n_batch"),
    ({"type_k": "q3"}, "type_k"), ({"flash_attn": "maybe"}, "flash_attn"), ({"tier": "tape"}, "tier"),
    ({"isolation": "vm"}, "isolation"), ({"restart": "always"}, "restart"), ({"backend": "torch"}, "backend"),
    ({"fingerprint": b"short"}, "fingerprint"), ({"policy": {"boundary_align_tokens": 0}}, "boundary_align_tokens"),
    ({"namespace": "str"}, "namespace"), ({"prefill_chunk": 0}, "prefill_chunk"), ({"swa_full": 1}, "swa_full"),
    ({"chat_template": ""}, "chat_template"), ({"n_threads": 0}, "n_threads"), ({"bogus": 1}, "bogus"),
])
def test_model_bad_values(kwargs, field):
    with pytest.raises(errors.ConfigError, match=field):
        ModelConfig.build(**kwargs)
