"""One test body run against the llama backend (tiny model) and the stub backend: the model
actor may rely on the same behaviour and the same errors from both."""

from __future__ import annotations

import numpy as np
import pytest

from erllama import errors
from erllama.backend.llama import LlamaBackend
from erllama.backend.protocol import Backend
from erllama.backend.stub import StubBackend
from erllama.config import ModelConfig

CFG = ModelConfig.build(n_ctx=512, n_batch=128, n_seq_max=2, n_threads=1, chat_template="chatml")


@pytest.fixture(params=["llama", "stub"])
def backend(request, tiny_path):
    be = LlamaBackend(tiny_path, CFG) if request.param == "llama" else StubBackend(None, CFG)
    yield be
    be.close()


def generate(be, sampler, seq, n):
    out = []
    for _ in range(n):
        t = be.sample(sampler, seq)
        out.append(t)
        be.step([(seq, [t])])
    return out


def test_conforms_to_the_protocol(backend):
    assert isinstance(backend, Backend)
    assert backend.n_seq_max == 2 and backend.n_batch == 128 and backend.n_ctx_seq >= 128


def test_text_round_trip(backend):
    toks = backend.tokenize("hello world")
    assert backend.detokenize(toks).strip() == "hello world"
    assert b"".join(backend.token_piece(t) for t in toks).decode().strip() == "hello world"
    text = backend.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "hi" in text
    with pytest.raises(errors.InvalidContent):
        backend.apply_chat_template([{"role": "user", "content": 5}])


def test_restored_state_with_stored_logits_continues_identically(backend):
    prompt = backend.tokenize("the cat and the dog")
    assert backend.step([(0, prompt)]) == [0]
    logits = backend.logits(0)
    blob = backend.state_get(0)
    s1, s2 = backend.new_sampler({}), backend.new_sampler({})
    try:
        original = generate(backend, s1, 0, 12)
        assert backend.state_set(1, blob) == len(prompt)
        first = backend.sample_logits(s2, logits)
        backend.step([(1, [first])])
        restored = [first] + generate(backend, s2, 1, 11)
        assert restored == original
    finally:
        backend.free_sampler(s1)
        backend.free_sampler(s2)


def test_same_errors_for_the_same_bad_input(backend):
    backend.step([(0, [1, 5, 6])])
    before = backend.n_past(0)
    for rows, exc in [([(0, [backend.n_vocab])], errors.InvalidToken), ([(0, [])], errors.EmptyPrompt),
                      ([(0, [5] * 129)], errors.BatchOverflow), ([(2, [5])], errors.InvalidParameter),
                      ([(0, [5]), (0, [5])], errors.InvalidParameter)]:
        with pytest.raises(exc):
            backend.step(rows)
        assert backend.n_past(0) == before
    with pytest.raises(errors.ContextOverflow):
        for _ in range(100):
            backend.step([(1, [5] * 100)])
    with pytest.raises(errors.StateError):
        backend.state_set(1, b"garbage")
    assert backend.n_past(1) == 0
    with pytest.raises(errors.NoLogits):
        backend.logits(1)
    backend.request_abort()
    with pytest.raises(errors.Aborted):
        backend.step([(0, [5])])
    assert backend.n_past(0) == before
    backend.clear_abort()
    assert backend.step([(0, [5])]) == [0]


def test_seeded_sampling_is_reproducible(backend):
    prompt = backend.tokenize("abc")

    def run(seed):
        backend.seq_clear(0)
        backend.step([(0, prompt)])
        s = backend.new_sampler({"temperature": 5.0, "seed": seed})
        try:
            return generate(backend, s, 0, 10)
        finally:
            backend.free_sampler(s)

    assert run(3) == run(3)
    logits = np.zeros(backend.n_vocab, dtype=np.float32)
    greedy = backend.new_sampler({})
    logits[7] = 1.0
    assert backend.sample_logits(greedy, logits) == 7
    backend.free_sampler(greedy)
