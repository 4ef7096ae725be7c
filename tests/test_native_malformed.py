"""Malformed GGUF models and LoRA adapters fail with MalformedGGUF / LoadFailed, never a crash.

Every file loaded in this process comes from ``erllama.testing.malformed.ALL_CASES`` or
``ADAPTER_CASES``: each was first probed in a child process and shown to raise cleanly.
Files that make llama.cpp abort (``ABORT_CASES``) are only ever opened in child processes.
Self-contained: the fixtures live here.
"""

from __future__ import annotations

import gc
import math

import pytest

from erllama import _native as native
from erllama import errors
from erllama.testing import malformed as M


@pytest.fixture(scope="module")
def valid_model_path(tiny_path):
    return tiny_path


@pytest.fixture(scope="module")
def base_model(tiny_model):
    return tiny_model


def _live():
    gc.collect()
    return native.live_objects()


def _check_error(exc: BaseException, path, expected: tuple[str, str]) -> None:
    kind, fragment = expected
    msg = str(exc)
    assert isinstance(exc, errors.LoadFailed), f"{type(exc).__name__}: {msg}"
    if kind == "MalformedGGUF":
        assert type(exc) is errors.MalformedGGUF, f"expected MalformedGGUF, got {type(exc).__name__}: {msg}"
    assert str(path) in msg, f"the message does not name the path: {msg}"
    assert fragment in msg, f"the message does not give the reason {fragment!r}: {msg}"
    assert "no log output" not in msg


# ---- the tables themselves -------------------------------------------------------------------

def test_tables_are_consistent():
    assert set(M.EXPECTED) == set(M.ALL_CASES)
    assert set(M.ADAPTER_EXPECTED) == set(M.ADAPTER_CASES)
    assert set(M.ABORT_LOG) == set(M.ABORT_CASES)
    assert not (set(M.ALL_CASES) & set(M.ABORT_CASES))
    assert len(M.ALL_CASES) >= 30 and len(M.ADAPTER_CASES) >= 4
    for name, (kind, fragment) in {**M.EXPECTED, **M.ADAPTER_EXPECTED}.items():
        assert kind in ("MalformedGGUF", "LoadFailed") and fragment, name
    for name, w in {**M.ALL_CASES, **M.ADAPTER_CASES}.items():
        assert w.__doc__ and w.__doc__.strip(), f"writer {name} has no docstring"
    stages = {"load", "context", "tokenize", "decode", "adapter_load", "adapter_decode"}
    for name, (w, stage, observed) in M.ABORT_CASES.items():
        assert callable(w) and w.__doc__ and stage in stages and observed.startswith("SIG"), name


def test_control_files_are_valid(tmp_path):
    """The Spec writer itself is sound: unmodified, its model and LoRA load and decode."""
    model = native.Model.load(M.spec_control(tmp_path / "control.gguf"))
    adapter = native.Adapter.load(model, M.lora_control(tmp_path / "control-lora.gguf"))
    ctx = native.Context.create(model, n_ctx=256, n_threads=1)
    try:
        toks = model.tokenize("hello world", add_special=True)
        assert toks[0] == 1 and len(toks) >= 3
        assert ctx.step([(0, toks)]) == [0]
        plain = list(ctx.logits(0))
        ctx.clear()
        ctx.set_adapters([(adapter, 1.0)])
        ctx.step([(0, toks)])
        lora = list(ctx.logits(0))
        assert all(math.isfinite(x) for x in plain + lora)
        assert plain != lora
    finally:
        ctx.free()
        adapter.free()
        model.free()


def test_byte_cases_start_from_the_tiny_model():
    lay = M.tiny_layout()
    assert lay.data[:4] == b"GGUF" and lay.data_offset % 32 == 0
    assert len(lay.tensor) == 21 and "tokenizer.ggml.tokens" in lay.kv


# ---- models ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(M.ALL_CASES))
def test_malformed_model_raises(name, tmp_path):
    path = M.ALL_CASES[name](tmp_path / f"{name}.gguf")
    before = _live()
    with pytest.raises(errors.LoadFailed) as info:
        native.Model.load(path)
    _check_error(info.value, path, M.EXPECTED[name])
    del info
    assert _live() == before


def test_missing_path_is_file_not_found(tmp_path, base_model):
    missing = tmp_path / "nope" / "model.gguf"
    with pytest.raises(FileNotFoundError):
        native.Model.load(missing)
    with pytest.raises(FileNotFoundError):
        native.Adapter.load(base_model, missing)


def test_process_is_healthy_after_all_failures(tmp_path, valid_model_path):
    """Every failure in a row, then a valid model loads, tokenizes and decodes; nothing leaked."""
    before = _live()
    kinds = {}
    for name, writer in M.ALL_CASES.items():
        path = writer(tmp_path / f"{name}.gguf")
        try:
            native.Model.load(path)
        except errors.LoadFailed as exc:
            kinds[name] = type(exc).__name__
        else:
            pytest.fail(f"{name} loaded")
    assert _live() == before
    assert kinds["bad_magic"] == "MalformedGGUF"

    model = native.Model.load(valid_model_path)
    ctx = native.Context.create(model, n_ctx=256, n_threads=1)
    try:
        assert _live()["Model"] == before["Model"] + 1
        toks = model.tokenize("the cat is on the dog", add_special=True)
        assert toks[0] == 1
        assert ctx.step([(0, toks)]) == [0]
        logits = ctx.logits(0)
        assert len(logits) == model.n_vocab and all(math.isfinite(x) for x in logits)
        nxt = max(range(model.n_vocab), key=lambda i: logits[i])
        assert ctx.step([(0, [nxt])]) == [0]
        assert ctx.n_past(0) == len(toks) + 1
    finally:
        ctx.free()
        model.free()
    assert _live() == before


# ---- LoRA adapters -----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(M.ADAPTER_CASES))
def test_malformed_adapter_raises(name, tmp_path, base_model):
    path = M.ADAPTER_CASES[name](tmp_path / f"{name}.gguf")
    before = _live()
    children = base_model.n_children
    with pytest.raises(errors.LoadFailed) as info:
        native.Adapter.load(base_model, path)
    _check_error(info.value, path, M.ADAPTER_EXPECTED[name])
    del info
    assert _live() == before
    assert base_model.n_children == children


@pytest.mark.parametrize("name", ["fifo", "directory"])
def test_adapter_not_a_regular_file(name, tmp_path, base_model):
    path = M.ALL_CASES[name](tmp_path / f"{name}.gguf")
    children = base_model.n_children
    with pytest.raises(errors.MalformedGGUF, match="is not a regular file"):
        native.Adapter.load(base_model, path)
    assert base_model.n_children == children


def test_model_usable_after_adapter_failures(tmp_path, base_model):
    for name, writer in M.ADAPTER_CASES.items():
        with pytest.raises(errors.LoadFailed):
            native.Adapter.load(base_model, writer(tmp_path / f"{name}.gguf"))
    adapter = native.Adapter.load(base_model, M.lora_control(tmp_path / "good-lora.gguf"))
    ctx = native.Context.create(base_model, n_ctx=256, n_threads=1)
    try:
        ctx.set_adapters([(adapter, 0.5)])
        assert ctx.step([(0, base_model.tokenize("hello", add_special=True))]) == [0]
        assert all(math.isfinite(x) for x in ctx.logits(0))
    finally:
        ctx.free()
        adapter.free()


# ---- the classifier on its own -------------------------------------------------------------

OOM_LINES = [
    "ggml_backend_cpu_buffer_type_alloc_buffer: failed to allocate buffer of size 68719476736",
    "alloc_tensor_range: failed to allocate CPU buffer of size 68719476736",
    "llama_model_load: error loading model: unable to allocate CPU buffer",
    "llama_model_load_from_file_impl: failed to load model",
]
MAGIC_LINES = [
    "gguf_init_from_reader: invalid magic characters: 'GGUX', expected 'GGUF'",
    "llama_model_load: error loading model: llama_model_loader: failed to load model from /m/x.gguf",
    "llama_model_load_from_file_impl: failed to load model",
]


def test_classify_out_of_memory_is_load_failed():
    exc = native.classify_load_failure("/m/big.gguf", OOM_LINES)
    assert type(exc) is errors.LoadFailed
    assert "/m/big.gguf" in str(exc) and "failed to allocate" in str(exc)
    for line in ("llama_model_load: error loading model: std::bad_alloc",
                 "llama_model_loader: mmap failed: Cannot allocate memory"):
        assert type(native.classify_load_failure("/m/x.gguf", [line])) is errors.LoadFailed, line


def test_classify_bad_magic_is_malformed():
    exc = native.classify_load_failure("/m/x.gguf", MAGIC_LINES)
    assert type(exc) is errors.MalformedGGUF
    assert "/m/x.gguf" in str(exc) and "invalid magic characters" in str(exc)
    exc = native.classify_load_failure("/m/a.gguf", ["llama_adapter_lora_init_from_file_ptr: failed to apply "
                                                     "lora adapter: LoRA tensor 'x' has unexpected suffix"],
                                       what="LoRA adapter")
    assert type(exc) is errors.MalformedGGUF and "LoRA adapter" in str(exc)


def test_classify_without_lines_is_load_failed():
    exc = native.classify_load_failure("/m/x.gguf", [])
    assert type(exc) is errors.LoadFailed and "no log output" in str(exc)
    exc = native.classify_load_failure("/m/x.gguf", ["", "   "])
    assert type(exc) is errors.LoadFailed


def test_classify_memory_wins_over_format_words():
    """An allocation failure is LoadFailed even when other lines mention tensors."""
    lines = ["llama_model_load: error loading model: tensor 'output.weight' buffer: failed to allocate 8 GiB"]
    assert type(native.classify_load_failure("/m/x.gguf", lines)) is errors.LoadFailed


# ---- aborting files: only in child processes -------------------------------------------------

_PREFIX = {"load": [], "context": ["load"], "tokenize": ["load", "context"],
           "decode": ["load", "context", "tokenize"], "adapter_load": [],
           "adapter_decode": ["adapter_load", "set_adapters"]}
# one case per stage keeps the file fast; scripts can probe all of M.ABORT_CASES the same way
_ONE_PER_STAGE = sorted({stage: name for name, (_, stage, _) in M.ABORT_CASES.items()}.values())


@pytest.mark.parametrize("name", _ONE_PER_STAGE)
def test_abort_case_kills_a_child_process(name, tmp_path):
    writer, stage, observed = M.ABORT_CASES[name]
    result = M.probe(writer(tmp_path / f"{name}.gguf"), adapter=stage.startswith("adapter"))
    assert result["signal"] == observed, result
    assert result["stages_ok"] == _PREFIX[stage], result
    assert result["abort_line"] and result["abort_line"].endswith(M.ABORT_LOG[name]), result


def test_probe_reports_a_clean_failure(tmp_path):
    result = M.probe(M.bad_magic(tmp_path / "bad.gguf"))
    assert result["returncode"] == 0 and result["signal"] is None
    assert result["raised"].startswith("RAISED load MalformedGGUF")


def test_words_in_the_path_do_not_change_the_verdict(tmp_path):
    """A directory named like a memory failure ("mlock", "out of memory") must not turn a bad
    magic into LoadFailed: the path is ignored when classifying."""
    for dirname in ("mlock_models", "out of memory", "failed to allocate"):
        d = tmp_path / dirname
        d.mkdir()
        path = M.bad_magic(d / "bad.gguf")
        with pytest.raises(errors.MalformedGGUF, match="magic"):
            native.Model.load(path)


def test_specific_line_survives_the_generic_filter():
    lines = ["gguf_init_from_file_impl: failed to load model: this GGUF file version 50331648 is extremely "
             "large, is there a mismatch between the host and model endianness?",
             "llama_model_load_from_file_impl: failed to load model"]
    exc = native.classify_load_failure("/m/x.gguf", lines)
    assert type(exc) is errors.MalformedGGUF and "extremely large" in str(exc)


def test_io_errors_are_load_failed_not_malformed():
    line = "gguf_init_from_file: failed to open GGUF file '/m/x.gguf' (Permission denied)"
    assert type(native.classify_load_failure("/m/x.gguf", [line])) is errors.LoadFailed


def test_unreadable_file_raises_permission_error(tmp_path, tiny_path, monkeypatch):
    import os
    import shutil

    path = tmp_path / "locked.gguf"
    shutil.copy(tiny_path, path)
    os.chmod(path, 0)
    if os.access(path, os.R_OK):  # running as root: file modes do not apply, so pretend
        monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(PermissionError, match="not readable"):
        native.Model.load(path)
