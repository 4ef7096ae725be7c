"""Ownership and safety: use after free, deferred model free, GIL release, arbitrary prefills."""

from __future__ import annotations

import gc
import threading
import time
import warnings

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from erllama import _native as native
from erllama import errors


def test_use_after_free_raises_released(tiny_path, tiny_lora_path):
    model = native.Model.load(tiny_path)
    ctx = native.Context.create(model, n_ctx=256, n_threads=1)
    sampler = native.Sampler(model)
    adapter = native.Adapter.load(model, tiny_lora_path)
    ctx.step([(0, [1, 2, 3])])
    sampler.free()
    adapter.free()
    ctx.free()
    ctx.free()  # idempotent
    for call in (lambda: ctx.step([(0, [5])]), lambda: ctx.logits(0), lambda: ctx.state_get(0),
                 lambda: ctx.state_set(0, b"x"), lambda: ctx.pos_max(0), lambda: ctx.clear(),
                 lambda: ctx.set_adapters([])):
        with pytest.raises(errors.Released):
            call()
    with pytest.raises(errors.Released):
        sampler.sample_logits([0.0] * model.n_vocab)
    with pytest.raises(errors.Released):
        sampler.reset()
    assert model.free() == "freed"
    assert model.free() == "already"
    for call in (lambda: model.tokenize("a"), lambda: model.detokenize([5]), lambda: model.meta("x"),
                 lambda: model.size, lambda: model.is_eog(2), lambda: native.Context.create(model),
                 lambda: native.Sampler(model), lambda: native.Adapter.load(model, tiny_lora_path)):
        with pytest.raises(errors.Released):
            call()


def test_model_free_is_deferred_while_children_live(tiny_path, tiny_lora_path):
    model = native.Model.load(tiny_path)
    ctx = native.Context.create(model, n_ctx=256, n_threads=1)
    sampler = native.Sampler(model)
    adapter = native.Adapter.load(model, tiny_lora_path)
    assert model.n_children == 3
    live = native.live_objects()["Model"]
    assert model.free() == "deferred"
    assert model.alive and model.free_pending
    # children keep working on the pending model ...
    ctx.step([(0, [1, 2, 3])])
    assert sampler.sample(ctx, 0) >= 0
    # ... but nothing new may be made from it
    with pytest.raises(errors.Released, match="being freed"):
        native.Context.create(model)
    with pytest.raises(errors.Released, match="being freed"):
        model.tokenize("abc")
    sampler.free()
    adapter.free()
    assert model.alive
    ctx.free()  # the last child performs the model free
    assert not model.alive
    assert native.live_objects()["Model"] == live - 1


def test_children_keep_the_model_alive_without_references(tiny_path):
    model = native.Model.load(tiny_path)
    ctx = native.Context.create(model, n_ctx=256, n_threads=1)
    del model
    gc.collect()
    ctx.step([(0, [1, 2, 3])])  # the context holds its model
    assert ctx.model.alive
    ctx.model.free()
    ctx.free()


def test_dealloc_without_free_warns_and_releases(tiny_path):
    model = native.Model.load(tiny_path)
    ctx = native.Context.create(model, n_ctx=256, n_threads=1)
    before = native.live_objects()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del ctx, model
        gc.collect()
    after = native.live_objects()
    assert after["Context"] == before["Context"] - 1 and after["Model"] == before["Model"] - 1
    assert any(issubclass(w.category, ResourceWarning) for w in caught)


def test_small_steps_complete_inside_a_long_decode(tiny_model):
    """While one thread is inside a long decode, another thread completes whole steps on its
    own context: the GIL is released around llama_decode."""
    big = native.Context.create(tiny_model, n_ctx=512, n_batch=512, n_threads=1)
    small = native.Context.create(tiny_model, n_ctx=512, n_batch=512, n_threads=1)
    spans: list[tuple[float, float]] = []
    steps: list[tuple[float, float]] = []
    done = threading.Event()

    def long_decodes():
        for _ in range(5):
            big.clear()
            t0 = time.perf_counter()
            big.step([(0, [5] * 500)])
            spans.append((t0, time.perf_counter()))
        done.set()

    try:
        t = threading.Thread(target=long_decodes)
        t.start()
        while not done.is_set():
            small.clear()
            t0 = time.perf_counter()
            small.step([(0, [1, 7])])
            steps.append((t0, time.perf_counter()))
        t.join()
    finally:
        big.free()
        small.free()
    nested = [s for s in steps if any(a < s[0] and s[1] < b for a, b in spans)]
    assert len(nested) >= 3, (len(steps), spans[:2])


@pytest.fixture(scope="module")
def prop_ctx(tiny_model):
    ctx = native.Context.create(tiny_model, n_ctx=256, n_batch=256, n_threads=1)
    yield ctx
    ctx.free()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_arbitrary_prefill_never_crashes(tiny_model, prop_ctx, data):
    """Any prefill length from 0 to 2*n_ctx with arbitrary ids succeeds or raises an ErllamaError."""
    ctx = prop_ctx
    n = data.draw(st.integers(0, 2 * ctx.n_ctx))
    ids = data.draw(st.one_of(
        st.lists(st.integers(0, tiny_model.n_vocab - 1), min_size=n, max_size=n),
        st.lists(st.integers(-2**40, 2**40), min_size=n, max_size=n),
        st.lists(st.one_of(st.integers(-3, tiny_model.n_vocab + 3), st.floats(), st.none(), st.text(max_size=2)),
                 min_size=n, max_size=n),
    ))
    if not data.draw(st.booleans()):
        ctx.seq_clear(0)
    before = ctx.pos_max(0)
    try:
        ctx.step([(0, ids)])
    except errors.ErllamaError:
        assert ctx.pos_max(0) == before  # a refused prefill changes nothing
    else:
        assert ctx.pos_max(0) == before + len(ids)
        assert ctx.has_logits(0)
