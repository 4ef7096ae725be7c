"""Sampler chains on the tiny model: greedy, seeded temperature, filters, grammar, logits buffers."""

from __future__ import annotations

import numpy as np
import pytest

from erllama import _native as native
from erllama import errors

PROMPT = [1, 20, 40, 60, 80, 100, 120]


def generate(ctx, sampler, n, seq=0):
    out = []
    for _ in range(n):
        tok = sampler.sample(ctx, seq)
        out.append(tok)
        ctx.step([(seq, [tok])])
    return out


def test_greedy_is_argmax(tiny_model, tiny_ctx):
    s = native.Sampler(tiny_model)
    try:
        tiny_ctx.step([(0, PROMPT)])
        for _ in range(10):
            want = int(np.argmax(tiny_ctx.logits(0)))
            tok = s.sample(tiny_ctx, 0)
            assert tok == want
            tiny_ctx.step([(0, [tok])])
        assert s.seed is None
    finally:
        s.free()


def test_sample_logits_matches_context_sampling(tiny_model, tiny_ctx):
    a = native.Sampler(tiny_model, temperature=0.8, seed=7, top_k=50)
    b = native.Sampler(tiny_model, temperature=0.8, seed=7, top_k=50)
    try:
        tiny_ctx.step([(0, PROMPT)])
        for _ in range(8):
            logits = tiny_ctx.logits(0)
            t1 = b.sample_logits(logits)
            t2 = a.sample(tiny_ctx, 0)
            assert t1 == t2
            tiny_ctx.step([(0, [t2])])
        with pytest.raises(errors.InvalidParameter, match="n_vocab"):
            a.sample_logits(np.zeros(5, dtype=np.float32))
        assert b.sample_logits(list(map(float, logits))) in range(tiny_model.n_vocab)  # any float sequence
    finally:
        a.free()
        b.free()


def test_seeded_temperature(tiny_model):
    def run(seed):
        ctx = native.Context.create(tiny_model, n_ctx=256, n_threads=1)
        s = native.Sampler(tiny_model, temperature=1.5, seed=seed)
        try:
            ctx.step([(0, PROMPT)])
            assert s.seed == seed
            return generate(ctx, s, 24)
        finally:
            s.free()
            ctx.free()

    assert run(1) == run(1)
    assert run(1) != run(2)
    s = native.Sampler(tiny_model, temperature=1.0)  # no seed: a random one is drawn
    try:
        assert isinstance(s.seed, int)
    finally:
        s.free()


def test_filters_and_penalty(tiny_model, tiny_ctx):
    tiny_ctx.step([(0, PROMPT)])
    logits = tiny_ctx.logits(0)
    top = int(np.argmax(logits))
    top5 = set(np.argsort(logits)[-5:].tolist())
    k1 = native.Sampler(tiny_model, temperature=5.0, top_k=1, seed=3)
    k5 = native.Sampler(tiny_model, temperature=5.0, top_k=5, seed=3)
    p = native.Sampler(tiny_model, temperature=5.0, top_p=1e-6, seed=3)
    m = native.Sampler(tiny_model, temperature=5.0, min_p=0.999, seed=3)
    rep = native.Sampler(tiny_model, repetition_penalty=1e6, penalty_last_n=64)
    try:
        for _ in range(20):
            assert k1.sample_logits(logits) == top
            assert k5.sample_logits(logits) in top5
            assert p.sample_logits(logits) == top
            assert m.sample_logits(logits) == top
        # a huge repetition penalty never picks an accepted token again
        rep.accept([top])
        assert rep.sample_logits(logits) != top
        rep.reset()
        assert rep.sample_logits(logits) == top
    finally:
        for s in (k1, k5, p, m, rep):
            s.free()


def test_bad_parameters(tiny_model):
    for kwargs, name in [({"temperature": -1.0}, "temperature"), ({"top_p": 0.0}, "top_p"),
                         ({"top_p": 1.5}, "top_p"), ({"min_p": 2.0}, "min_p"),
                         ({"repetition_penalty": 0.0}, "repetition_penalty"),
                         ({"temperature": float("nan")}, "temperature"), ({"top_k": -2}, "top_k"),
                         ({"seed": -5}, "seed"), ({"seed": 2**40}, "seed")]:
        with pytest.raises(errors.InvalidParameter, match=name):
            native.Sampler(tiny_model, **kwargs)


def test_grammar_constrains_output(tiny_model, tiny_ctx):
    # letters a..c only: every sampled piece must match, whatever the random weights prefer
    s = native.Sampler(tiny_model, grammar='root ::= [a-c]+ "z"')
    try:
        tiny_ctx.step([(0, PROMPT)])
        pieces = b"".join(tiny_model.token_to_piece(t) for t in generate(tiny_ctx, s, 12))
        assert pieces and set(pieces.decode()) <= set("abcz")
    finally:
        s.free()
    for bad in ('root ::= "a', "root ::= undefined_rule", "nonsense", ""):
        with pytest.raises(errors.GrammarError):
            native.Sampler(tiny_model, grammar=bad)
    with pytest.raises(errors.GrammarError, match="root"):
        native.Sampler(tiny_model, grammar='start ::= "a"')


def test_sample_needs_logits(tiny_model, tiny_ctx):
    s = native.Sampler(tiny_model)
    try:
        with pytest.raises(errors.NoLogits):
            s.sample(tiny_ctx, 0)
        tiny_ctx.step([(0, PROMPT, False)])
        with pytest.raises(errors.NoLogits):
            s.sample(tiny_ctx, 0)
        with pytest.raises(errors.InvalidParameter, match="seq_id"):
            s.sample(tiny_ctx, 5)
    finally:
        s.free()
