"""Context-level native functions on the tiny model: creation, the multi-sequence step,
logits, memory, state, abort, embeddings, adapters."""

from __future__ import annotations

import numpy as np
import pytest

from erllama import _native as native
from erllama import errors

PROMPT_A = [1, 20, 40, 60, 80, 100, 120, 140, 160, 180, 200, 220]
PROMPT_B = [1, 270, 271, 272, 273, 274]


def run_alone(model, tokens, extra=()):
    """Logits after decoding ``tokens`` (then each of ``extra``) alone in a fresh context."""
    ctx = native.Context.create(model, n_ctx=256, n_batch=256, n_threads=1)
    try:
        ctx.step([(0, tokens)])
        for t in extra:
            ctx.step([(0, [t])])
        return ctx.logits(0)
    finally:
        ctx.free()


def test_create_and_params(tiny_model):
    ctx = native.Context.create(tiny_model, n_ctx=1024, n_batch=128, n_ubatch=64, n_seq_max=4,
                                n_threads=1, type_k="f32", type_v="f16", flash_attn=False, swa_full=False)
    try:
        assert (ctx.n_ctx, ctx.n_batch, ctx.n_ubatch, ctx.n_seq_max) == (1024, 128, 64, 4)
        assert ctx.n_ctx_seq == 256
        assert ctx.params["type_k"] == "f32" and ctx.params["flash_attn"] is False
        assert ctx.model is tiny_model
    finally:
        ctx.free()
    for kwargs, field in [({"n_seq_max": 0}, "n_seq_max"), ({"n_seq_max": 100000}, "n_seq_max"),
                          ({"n_batch": 0}, "n_batch"), ({"type_k": "q3_z"}, "type_k"),
                          ({"flash_attn": "maybe"}, "flash_attn"), ({"n_threads": -1}, "n_threads"),
                          ({"n_ctx": "big"}, "n_ctx"), ({"pooling": "max"}, "pooling"),
                          ({"type_v": ["f16"]}, "type_v")]:
        with pytest.raises(errors.InvalidParameter, match=field):
            native.Context.create(tiny_model, **kwargs)
    with pytest.raises(TypeError):
        native.Context()


def test_flash_attn_and_kv_types_decode(tiny_model):
    ref = run_alone(tiny_model, PROMPT_A)
    for kwargs in ({"flash_attn": True}, {"flash_attn": False}, {"type_k": "f32", "type_v": "f32"},
                   {"type_k": "bf16", "type_v": "f16"}):
        ctx = native.Context.create(tiny_model, n_ctx=256, n_threads=1, **kwargs)
        try:
            ctx.step([(0, PROMPT_A)])
            got = ctx.logits(0)
            assert int(np.argmax(got)) == int(np.argmax(ref)) or np.max(np.abs(got - ref)) < 0.1, kwargs
        finally:
            ctx.free()
    # a quantized KV type whose block does not divide the tiny model's head size of 16
    with pytest.raises(errors.ContextFailed, match="does not divide"):
        native.Context.create(tiny_model, n_ctx=256, type_k="q8_0", type_v="q8_0", flash_attn=True)


def test_step_mixes_sequences_with_correct_positions(tiny_model, tiny_ctx):
    ctx = tiny_ctx
    # seq 0 prefills first; then one step mixes a decode row of seq 0 with a prefill of seq 1
    assert ctx.step([(0, PROMPT_A)]) == [0]
    assert ctx.pos_max(0) == len(PROMPT_A) - 1 and ctx.pos_max(1) == -1
    assert ctx.step([(0, [42]), (1, PROMPT_B)]) == [0, 1]
    assert ctx.n_past(0) == len(PROMPT_A) + 1 and ctx.n_past(1) == len(PROMPT_B)
    got0, got1 = ctx.logits(0), ctx.logits(1)
    want0 = run_alone(tiny_model, PROMPT_A, [42])
    want1 = run_alone(tiny_model, PROMPT_B)
    np.testing.assert_allclose(got0, want0, atol=1e-4)
    np.testing.assert_allclose(got1, want1, atol=1e-4)
    assert not np.allclose(got0, got1)


def test_step_logits_flags_and_validity(tiny_ctx):
    ctx = tiny_ctx
    assert ctx.step([(0, PROMPT_A, False), (1, PROMPT_B)]) == [1]
    assert not ctx.has_logits(0) and ctx.has_logits(1)
    with pytest.raises(errors.NoLogits, match="seq 0"):
        ctx.logits(0)
    ctx.step([(0, [5])])
    with pytest.raises(errors.NoLogits, match="seq 1"):
        ctx.logits(1)  # a later step overwrites the context's outputs
    out = np.zeros(ctx.n_vocab, dtype=np.float32)
    assert ctx.logits(0, out=out) is out and np.any(out != 0)
    with pytest.raises(errors.InvalidParameter, match="n_vocab"):
        ctx.logits(0, out=np.zeros(3, dtype=np.float32))
    assert ctx.step([]) == []


def test_step_rejects_bad_input_without_side_effects(tiny_model):
    ctx = native.Context.create(tiny_model, n_ctx=256, n_batch=64, n_seq_max=2, n_threads=1)
    try:
        ctx.step([(0, PROMPT_A)])
        before = (ctx.pos_max(0), ctx.pos_max(1))
        cases = [
            ([(0, [1, 2, ctx.n_vocab])], errors.InvalidToken, "outside the vocabulary"),
            ([(0, [1, -3])], errors.InvalidToken, "-3"),
            ([(1, [5]), (0, [1.5])], errors.InvalidToken, "not a token id"),
            ([(0, [])], errors.EmptyPrompt, "seq 0"),
            ([(0, [5] * 65)], errors.BatchOverflow, "n_batch=64"),
            ([(0, [5] * 40), (1, [5] * 40)], errors.BatchOverflow, "n_batch=64"),
            ([(2, [5])], errors.InvalidParameter, "seq_id"),
            ([(0, [5]), (0, [6])], errors.InvalidParameter, "twice"),
            ([(0, 5)], errors.InvalidToken, "sequence of token ids"),
            ([[0, [5]]], errors.InvalidParameter, "step row"),
        ]
        for rows, exc, msg in cases:
            with pytest.raises(exc, match=msg):
                ctx.step(rows)
            assert (ctx.pos_max(0), ctx.pos_max(1)) == before, rows
        # fill seq 1 up to its share of the KV (n_ctx / n_seq_max cells)
        cap = ctx.n_ctx_seq
        assert cap == ctx.n_ctx // 2
        while ctx.n_past(1) + 60 <= cap - 8:
            ctx.step([(1, [5] * 60)])
        ctx.step([(1, [5] * (cap - 8 - ctx.n_past(1)))])
        assert ctx.n_past(1) == cap - 8
        with pytest.raises(errors.ContextOverflow, match=f"exceed its context of {cap}"):
            ctx.step([(1, [5] * 9)])
        assert ctx.n_past(1) == cap - 8
        ctx.step([(1, [5] * 8)])
        assert ctx.n_past(1) == cap
        ctx.step([(0, [7])])  # the context still works
    finally:
        ctx.free()


def test_memory_ops(tiny_ctx):
    ctx = tiny_ctx
    ctx.step([(0, PROMPT_A), (1, PROMPT_B)])
    assert ctx.pos_min(0) == 0
    ctx.seq_rm(0, 5)
    assert ctx.pos_max(0) == 4 and not ctx.has_logits(0)
    ctx.seq_clear(1)
    assert ctx.pos_max(1) == -1
    ctx.step([(1, PROMPT_B)])
    ctx.clear()
    assert ctx.pos_max(0) == -1 and ctx.pos_max(1) == -1
    with pytest.raises(errors.InvalidParameter, match="range"):
        ctx.seq_rm(0, 5, 2)
    with pytest.raises(errors.InvalidParameter, match="seq_id"):
        ctx.pos_max(-1)


def test_state_roundtrip_across_sequences(tiny_model, tiny_ctx):
    ctx = tiny_ctx
    ctx.step([(0, PROMPT_A)])
    logits = ctx.logits(0)
    size = ctx.state_size(0)
    blob = ctx.state_get(0)
    assert len(blob) == size > 0
    buf = bytearray(size + 100)
    assert ctx.state_get(0, out=buf) == size and bytes(buf[:size]) == blob
    arr = np.zeros(size, dtype=np.uint8)
    assert ctx.state_get(0, out=arr) == size and arr.tobytes() == blob
    with pytest.raises(errors.InvalidParameter, match="needs"):
        ctx.state_get(0, out=bytearray(10))
    assert ctx.state_set(1, blob) == len(PROMPT_A)
    assert ctx.pos_max(1) == len(PROMPT_A) - 1 and not ctx.has_logits(1)
    # continuing the restored sequence gives exactly the original's logits
    ctx.step([(0, [33])])
    cont = ctx.logits(0)
    ctx.step([(1, [33])])
    np.testing.assert_array_equal(ctx.logits(1), cont)
    assert not np.array_equal(logits, cont)
    # into another context of the same model and shape
    other = native.Context.create(tiny_model, n_ctx=512, n_seq_max=2, n_threads=1)
    single = native.Context.create(tiny_model, n_ctx=256, n_seq_max=1, n_threads=1)
    try:
        other.state_set(0, memoryview(blob))
        other.step([(0, [33])])
        np.testing.assert_array_equal(other.logits(0), cont)
        # the blob records the KV stream layout: a context with another n_seq_max rejects it
        with pytest.raises(errors.StateError, match="n_stream mismatch"):
            single.state_set(0, blob)
    finally:
        other.free()
        single.free()


def test_state_set_rejects_garbage(tiny_ctx):
    ctx = tiny_ctx
    ctx.step([(0, PROMPT_A)])
    blob = ctx.state_get(0)
    for bad in (b"\x00" * 16, blob[: len(blob) // 2], b"\xff" * len(blob)):
        with pytest.raises(errors.StateError, match="seq 1"):
            ctx.state_set(1, bad)
        assert ctx.pos_max(1) == -1
    with pytest.raises(errors.StateError, match="empty"):
        ctx.state_set(1, b"")
    ctx.state_set(1, blob)
    assert ctx.pos_max(1) == len(PROMPT_A) - 1


def test_abort_flag_rolls_back(tiny_ctx):
    ctx = tiny_ctx
    ctx.step([(0, PROMPT_A)])
    ctx.request_abort()
    assert ctx.abort_requested
    with pytest.raises(errors.Aborted, match="aborted"):
        ctx.step([(0, [5] * 40), (1, PROMPT_B)])
    assert ctx.pos_max(0) == len(PROMPT_A) - 1 and ctx.pos_max(1) == -1
    ctx.clear_abort()
    assert ctx.step([(0, [5])]) == [0]


def test_embeddings(tiny_model):
    ctx = native.Context.create(tiny_model, n_ctx=256, n_threads=1, embeddings=True)
    mean = native.Context.create(tiny_model, n_ctx=256, n_threads=1, embeddings=True, pooling="mean")
    try:
        e = ctx.embed(PROMPT_A)
        assert e.shape == (tiny_model.n_embd,) and e.dtype == np.float32
        assert abs(float(np.linalg.norm(e)) - 1.0) < 1e-5
        raw = ctx.embed(PROMPT_A, normalize=False)
        assert abs(float(np.linalg.norm(raw)) - 1.0) > 1e-3
        np.testing.assert_allclose(raw / np.linalg.norm(raw), e, atol=1e-6)
        assert not np.allclose(ctx.embed(PROMPT_B), e)
        assert ctx.pos_max(0) == -1  # the embedding sequence is cleared afterwards
        m = mean.embed(PROMPT_A)
        assert m.shape == e.shape and not np.allclose(m, e)
        with pytest.raises(errors.EmptyPrompt):
            ctx.embed([])
        with pytest.raises(errors.InvalidToken):
            ctx.embed([1, 99999])
    finally:
        ctx.free()
        mean.free()
    plain = native.Context.create(tiny_model, n_ctx=256, n_threads=1)
    try:
        with pytest.raises(errors.NotSupported, match="embeddings=True"):
            plain.embed(PROMPT_A)
    finally:
        plain.free()


def test_lora_adapters(tiny_model, tiny_lora_path, tiny_path):
    base = run_alone(tiny_model, PROMPT_A)
    adapter = native.Adapter.load(tiny_model, tiny_lora_path)
    ctx = native.Context.create(tiny_model, n_ctx=256, n_threads=1)
    try:
        def logits_with(pairs):
            ctx.set_adapters(pairs)
            ctx.clear()
            ctx.step([(0, PROMPT_A)])
            return ctx.logits(0)

        full = logits_with([(adapter, 1.0)])
        assert np.max(np.abs(full - base)) > 1e-3
        half = logits_with([(adapter, 0.5)])
        assert not np.allclose(half, full)
        np.testing.assert_allclose(logits_with([(adapter, 0.0)]), base, atol=1e-5)
        np.testing.assert_allclose(logits_with([]), base, atol=1e-5)
        ctx.set_adapters([(adapter, 1.0)])
        assert adapter.free() == "deferred"  # in use by ctx
        assert adapter.alive
        with pytest.raises(errors.Released):
            ctx.set_adapters([(adapter, 1.0)])
        ctx.set_adapters([])  # drops the last use: the deferred free happens
        assert not adapter.alive
        for bad in ([adapter], [(adapter, float("inf"))], [("x", 1.0)]):
            with pytest.raises(errors.InvalidParameter):
                ctx.set_adapters(bad)
        other_model = native.Model.load(tiny_path)
        other = native.Adapter.load(other_model, tiny_lora_path)
        with pytest.raises(errors.InvalidParameter, match="another model"):
            ctx.set_adapters([(other, 1.0)])
        other.free()
        other_model.free()
    finally:
        ctx.free()
        adapter.free()
