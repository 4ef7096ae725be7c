"""The known-good quantized model (``write_known_good_model``) on the real llama.cpp: the file
has the declared ggml types, its quantized blocks decode to the weights they were built from,
and it loads, decodes (one sequence, then two in a batch) and samples finite, deterministic
results."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize

from erllama import _native as native
from erllama.testing import ggufwrite as gw
from erllama.testing import malformed
from erllama.testing.tinymodel import KNOWN_GOOD_TYPES, KnownGoodSpec, known_good_spec, write_known_good_model

REQUIRED = {"Q4_0", "Q4_K", "Q6_K", "Q8_0", "F16", "F32"}
TEXT = "the cat and the dog"
OTHER = "hello world"


def reader_types(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    r = gguf.GGUFReader(str(path))
    try:
        return {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in r.tensors}
    finally:
        del r


def run(path: Path, n_greedy: int = 6) -> tuple[list[int], list[int], np.ndarray]:
    """Load ``path``, decode TEXT, greedy-sample ``n_greedy`` tokens, then decode the next token
    of seq 0 and OTHER as seq 1 in one batch. Returns (prompt tokens, greedy tokens, the
    batch's logits of seq 1 next to OTHER's logits decoded alone)."""
    model = native.Model.load(path)
    ctx = sampler = alone = None
    try:
        assert (model.n_embd, model.n_layer, model.n_head, model.n_head_kv) == (
            KnownGoodSpec.n_embd, KnownGoodSpec.n_layer, KnownGoodSpec.n_head, KnownGoodSpec.n_head_kv)
        toks = model.tokenize(TEXT, add_special=True)
        other = model.tokenize(OTHER, add_special=True)
        assert toks[0] == 1 and other[0] == 1 and len(toks) > 8   # BOS, then a multi-token batch
        ctx = native.Context.create(model, n_ctx=512, n_batch=512, n_seq_max=2, n_threads=1)
        sampler = native.Sampler(model)   # temperature 0: greedy
        assert ctx.step([(0, toks)]) == [0]
        greedy = []
        for _ in range(n_greedy):
            logits = ctx.logits(0)
            assert logits.shape == (model.n_vocab,) and np.isfinite(logits).all()
            assert logits.std() > 0.1   # not a constant (e.g. all-zero) output
            t = sampler.sample(ctx, 0)
            assert t == int(np.argmax(logits))
            greedy.append(t)
            ctx.step([(0, [t])])
        assert ctx.step([(0, [greedy[-1]]), (1, other)]) == [0, 1]
        l0, l1 = ctx.logits(0), ctx.logits(1)
        assert np.isfinite(l0).all() and np.isfinite(l1).all()
        assert not np.allclose(l0, l1)
        assert ctx.n_past(0) == len(toks) + n_greedy + 1 and ctx.n_past(1) == len(other)
        alone = native.Context.create(model, n_ctx=256, n_threads=1)
        alone.step([(0, other)])
        return toks, greedy, np.stack([l1, alone.logits(0)])
    finally:
        for obj in (alone, sampler, ctx):
            if obj is not None:
                obj.free()
        model.free()


def test_declared_types_are_in_the_file(tmp_path):
    assert REQUIRED <= set(KNOWN_GOOD_TYPES.values())
    assert all(t == "F32" for name, t in KNOWN_GOOD_TYPES.items() if "norm" in name)
    path = write_known_good_model(tmp_path / "kg.gguf")
    got = reader_types(path)
    assert {name: t for name, (t, _) in got.items()} == KNOWN_GOOD_TYPES
    g = KnownGoodSpec
    assert got["blk.0.attn_q.weight"][1] == (g.n_embd, g.n_head * g.head_dim)   # gguf: ggml ne order
    assert got["blk.1.ffn_down.weight"][1] == (g.n_ff, g.n_embd)
    assert 100_000 < path.stat().st_size < 4_000_000


@pytest.mark.parametrize("name", ["Q4_0", "Q8_0", "Q4_K", "Q6_K", "F16"])
def test_quantized_blocks_decode_to_their_weights(name):
    # gguf's numpy dequantizer is an independent reading of the ggml block layouts
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((8, 512)) * 0.05).astype(np.float32)
    t = gw.GGML_TYPES[name]
    raw = np.frombuffer(gw.quantize(x, t), np.uint8)
    assert raw.size == gw.ggml_nbytes((512, 8), t)
    y = dequantize(raw.reshape(8, -1), gguf.GGMLQuantizationType[name])
    assert y.shape == x.shape
    tol = {"Q4_0": 0.13, "Q4_K": 0.1, "Q6_K": 0.03, "Q8_0": 0.01, "F16": 0.001}[name]
    assert np.abs(y - x).max() <= tol * np.abs(x).max()
    assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0.99
    if t != gw.GGML_F16:
        with pytest.raises(ValueError, match="multiple of"):
            gw.quantize(np.zeros((2, 48), np.float32), t)


def test_the_file_tensors_decode_to_the_spec_weights(tmp_path):
    # every quantized tensor in the file reads back close to the f32 weights of the same seed
    path = write_known_good_model(tmp_path / "kg.gguf", seed=3)
    r = gguf.GGUFReader(str(path))
    try:
        tensors = {t.name: t for t in r.tensors}
        rng = np.random.default_rng(3)
        for name, spec_t in zip(KNOWN_GOOD_TYPES, known_good_spec(seed=3).tensors):
            t = tensors[name]
            assert spec_t.name == name and bytes(t.data.tobytes()) == spec_t.data
            if "norm" in name:
                assert np.all(np.asarray(t.data) == 1.0)
                continue
            shape = tuple(reversed([int(d) for d in t.shape]))
            want = (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)
            got = dequantize(t.data, t.tensor_type).reshape(shape)
            assert np.corrcoef(want.ravel(), got.ravel())[0, 1] > 0.99, name
    finally:
        del r


def test_loads_decodes_and_samples(tmp_path):
    path = write_known_good_model(tmp_path / "kg.gguf")
    _, greedy, (batched, alone) = run(path)
    assert len(set(greedy)) > 1
    # seq 1 prefilled next to seq 0 is close to it prefilled alone: llama.cpp picks kernels by
    # batch shape and CPU, so neither the bits nor (with close logits) the argmax are promised
    assert np.abs(batched - alone).max() < 0.25


def test_deterministic_per_seed(tmp_path):
    a = write_known_good_model(tmp_path / "a.gguf", seed=5)
    b = write_known_good_model(tmp_path / "b.gguf", seed=5)
    c = write_known_good_model(tmp_path / "c.gguf", seed=6)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes() and a.stat().st_size == c.stat().st_size
    ra, rb, rc = run(a), run(b), run(c)
    assert ra[0] == rb[0] == rc[0]    # same vocabulary
    assert ra[1] == rb[1]
    np.testing.assert_array_equal(ra[2], rb[2])
    assert not np.array_equal(ra[2], rc[2])


def test_written_without_the_gguf_package(tmp_path):
    code = ("import sys; import erllama.testing.tinymodel as t; "
            f"t.write_known_good_model({str(tmp_path / 'x.gguf')!r}); print('gguf' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
    assert (tmp_path / "x.gguf").stat().st_size > 0


def test_malformed_keeps_the_writer_names():
    for name in ("KV", "TensorSpec", "Spec", "spec_bytes", "write_spec", "_tensor", "_pad", "_ALIGN"):
        assert getattr(malformed, name) is getattr(gw, name)
    assert (malformed.GGML_F32, malformed.GGML_F16, malformed.GGML_Q4_0, malformed.STR) == (0, 1, 2, 8)
