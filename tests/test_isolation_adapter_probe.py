"""``isolation="probe"`` covers LoRA adapters too: before ``load_adapter``, a child process loads
the model and the adapter, applies it and decodes, so an adapter that aborts llama.cpp raises
``MalformedGGUF`` instead of killing the host (issue 10).

The aborting adapters are the ``adapter_load`` / ``adapter_decode`` entries of
``erllama.testing.malformed.ABORT_CASES``; they are only ever opened by probe children, never
by this process. One application and one probed tiny model serve the whole module.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import erllama
from erllama import _native as native
from erllama import errors
from erllama.backend import probe
from erllama.backend.factory import check_adapter
from erllama.config import ModelConfig
from erllama.testing import malformed as M
from erllama.testing.tinymodel import write_tiny_lora

from child_helpers import probe_children

ADAPTER_ABORTS = sorted(name for name, (_, stage, _) in M.ABORT_CASES.items() if stage.startswith("adapter_"))
CLEAN = ["lora_bad_magic", "lora_arch_mismatch", "lora_wrong_shape"]
OPTS = dict(n_ctx=256, n_batch=64, n_threads=1)
PROMPT = "adapters change the numbers"


def _children() -> int:
    return probe.probe_stats()["children"]


@pytest.fixture(autouse=True)
def no_probe_child_left():
    yield
    assert probe_children() == []


@pytest.fixture(scope="module")
def files(tiny_path, tmp_path_factory):
    """A private copy of the tiny model, a good LoRA for it, and every aborting adapter."""
    d = tmp_path_factory.mktemp("adapters")
    out = {"model": Path(shutil.copyfile(tiny_path, d / "tiny.gguf")), "lora": write_tiny_lora(d / "lora.gguf")}
    out.update({name: M.ABORT_CASES[name][0](d / f"{name}.gguf") for name in ADAPTER_ABORTS})
    return out


@pytest.fixture(scope="module")
def model(app_dir, files):
    """The tiny model under the default isolation ("probe"), and its adapter-free completion."""
    mid = erllama.load_model(files["model"], model_id="tiny", **OPTS)
    assert erllama.model_info(mid).isolation == "probe"
    return mid, erllama.complete(mid, PROMPT, max_tokens=6).tokens


def test_the_adapter_cases():
    assert len(ADAPTER_ABORTS) == 6
    assert {M.ABORT_CASES[n][1] for n in ADAPTER_ABORTS} == {"adapter_load", "adapter_decode"}
    assert all(stage in probe.ADAPTER_STAGES for stage in ("adapter_load", "adapter_decode"))


@pytest.mark.parametrize("name", ADAPTER_ABORTS)
def test_aborting_adapter_is_refused_and_the_model_keeps_serving(name, model, files):
    """``ABORT_CASES[name]``: MalformedGGUF naming the adapter, the signal, the stage and the
    assert; this process is alive (the test goes on), the model neither restarted nor changed
    its adapter set and serves as before; a second try fails from the cache, without a child."""
    mid, base = model
    _, stage, observed = M.ABORT_CASES[name]
    path = files[name]
    n = _children()
    with pytest.raises(errors.MalformedGGUF) as info:
        erllama.load_adapter(mid, path)
    msg = str(info.value)
    assert str(path) in msg and f"died by {observed}" in msg and f"stage {stage!r}" in msg, msg
    assert M.ABORT_LOG[name] in msg, msg
    assert _children() == n + 1

    assert erllama.list_adapters(mid) == []
    state = erllama.model_info(mid)
    assert (state.status, state.restarts) == ("loaded", 0)
    assert erllama.complete(mid, PROMPT, max_tokens=6).tokens == base

    with pytest.raises(errors.MalformedGGUF) as again:
        erllama.load_adapter(mid, path)
    assert str(again.value) == msg and _children() == n + 1


def test_good_adapter_loads_changes_output_and_is_probed_once(app_dir, model, files):
    mid, base = model
    n, hits = _children(), probe.probe_stats()["cache_hits"]
    handle = erllama.load_adapter(mid, files["lora"])
    assert _children() == n + 1
    assert erllama.list_adapters(mid) == [{"handle": handle, "path": str(files["lora"]), "scale": 1.0}]
    with_lora = erllama.complete(mid, PROMPT, max_tokens=6).tokens
    assert with_lora != base
    erllama.unload_adapter(mid, handle)
    assert erllama.complete(mid, PROMPT, max_tokens=6).tokens == base

    handle = erllama.load_adapter(mid, files["lora"])  # cached: no second child
    assert _children() == n + 1 and probe.probe_stats()["cache_hits"] == hits + 1
    assert erllama.complete(mid, PROMPT, max_tokens=6).tokens == with_lora
    erllama.unload_adapter(mid, handle)
    assert erllama.complete(mid, PROMPT, max_tokens=6).tokens == base

    stored = json.loads((app_dir / "probes.json").read_text())
    entry = stored[os.path.realpath(files["lora"])]
    assert any(json.loads(k).get("adapter_of") == os.path.realpath(files["model"]) and r["ok"]
               for k, r in entry["results"].items())


def test_a_changed_adapter_is_probed_again(model, files, tmp_path):
    mid, _ = model
    lora = Path(shutil.copyfile(files["lora"], tmp_path / "lora.gguf"))
    n = _children()
    erllama.unload_adapter(mid, erllama.load_adapter(mid, lora))
    st = lora.stat()
    os.utime(lora, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    erllama.unload_adapter(mid, erllama.load_adapter(mid, lora))
    assert _children() == n + 2
    erllama.complete(mid, PROMPT, max_tokens=1)  # the barrier frees the unloaded adapters


@pytest.mark.parametrize("case", CLEAN)
def test_clean_adapter_error_is_reraised_as_the_same_class(case, model, tiny_model, tmp_path):
    """``ADAPTER_CASES`` fail cleanly, so loading one here is safe: the probe's error has the
    class and message the in-process load raises."""
    mid, base = model
    path = M.ADAPTER_CASES[case](tmp_path / f"{case}.gguf")
    with pytest.raises(errors.LoadFailed) as direct:
        native.Adapter.load(tiny_model, str(path))
    n = _children()
    with pytest.raises(errors.LoadFailed) as probed:
        erllama.load_adapter(mid, path)
    assert type(probed.value) is type(direct.value) and str(probed.value) == str(direct.value)
    assert _children() == n + 1
    assert erllama.list_adapters(mid) == []
    assert erllama.complete(mid, PROMPT, max_tokens=6).tokens == base


def test_missing_adapter_or_model_spawns_no_child(model, tmp_path):
    mid, _ = model
    n = _children()
    with pytest.raises(FileNotFoundError):
        erllama.load_adapter(mid, tmp_path / "missing.gguf")
    with pytest.raises(errors.ModelNotFound):
        erllama.load_adapter("no-such-model", tmp_path / "missing.gguf")
    assert _children() == n


def test_only_probe_isolation_probes_adapters(app_dir, files):
    """"none" and "process" (whose worker already isolates) load adapters without a probe."""
    n = _children()
    for isolation in ("none", "process"):
        check_adapter(files["model"], files["lora_a_3d"], ModelConfig.build(isolation=isolation, **OPTS))
    check_adapter(files["model"], files["lora_a_3d"], ModelConfig.build(backend="stub", **OPTS))
    assert _children() == n
    mid = erllama.load_model(files["model"], isolation="none", **OPTS)
    try:
        erllama.unload_adapter(mid, erllama.load_adapter(mid, files["lora"]))
        assert _children() == n
        erllama.complete(mid, PROMPT, max_tokens=1)
    finally:
        erllama.unload(mid)
