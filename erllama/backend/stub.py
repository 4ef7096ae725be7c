"""A deterministic pure-Python backend for fast scheduler and actor tests.

Tokens are UTF-8 bytes shifted by 3 (0 unk, 1 BOS, 2 EOS); the logits of a sequence are a
fixed function of its last tokens, so generation is reproducible and different prompts
continue differently. It validates inputs like the native binding and raises the same
``erllama.errors``. It proves nothing about llama.cpp: features are proven on the real
binding.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from erllama import errors

__all__ = ["StubBackend"]

_MAGIC = b"STUB"


class _Sampler:
    def __init__(self, params: dict[str, Any]) -> None:
        unknown = set(params) - {"temperature", "top_k", "top_p", "min_p", "repetition_penalty", "frequency_penalty",
                                 "presence_penalty", "seed", "grammar"}
        if unknown:
            raise errors.InvalidParameter(f"unknown sampler parameters {sorted(unknown)}")
        if params.get("grammar"):
            raise errors.NotSupported("the stub backend has no grammar support")
        t = params.get("temperature", 0.0)
        if not isinstance(t, int | float) or t < 0:
            raise errors.InvalidParameter(f"temperature must be a number >= 0, got {t!r}")
        self.temperature = float(t)
        self.rng = np.random.default_rng(params.get("seed"))
        self.freed = False


class StubBackend:
    """See ``backend.protocol.Backend``; ``config`` is a ``ModelConfig``."""

    def __init__(self, path: Any, config: Any, n_vocab: int = 259) -> None:
        self.n_vocab = n_vocab
        self.ftype_name = "all F32"
        self.n_seq_max = config.n_seq_max
        self.n_ctx_seq = max(1, config.n_ctx // config.n_seq_max)
        self.resident_seqs = tuple(range(config.n_seq_max, config.n_seq_max + getattr(config, "resident_seqs", 0)))
        self.n_batch = config.n_batch
        self.n_embd = 16
        self.adapters: list[tuple[Any, float]] = []
        self._seqs: list[list[int]] = [[] for _ in range(self.n_seq_max + len(self.resident_seqs))]
        self._logits: dict[int, np.ndarray] = {}
        self._abort = False
        self.closed = False
        self.steps = 0

    def _alive(self) -> None:
        if self.closed:
            raise errors.Released("stub backend was closed")

    def _seq(self, seq_id: Any) -> int:
        if isinstance(seq_id, bool) or not isinstance(seq_id, int) or not 0 <= seq_id < len(self._seqs):
            raise errors.InvalidParameter(f"seq_id must be an int in [0, {len(self._seqs)}), got {seq_id!r}")
        return seq_id

    def _tokens(self, tokens: Any, what: str) -> list[int]:
        out = []
        for i, t in enumerate(tokens):
            if isinstance(t, bool) or not isinstance(t, int | np.integer) or not 0 <= t < self.n_vocab:
                raise errors.InvalidToken(f"{what}[{i}] = {t!r} is outside the vocabulary [0, {self.n_vocab})")
            out.append(int(t))
        return out

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """UTF-8 bytes + 3, after a BOS."""
        return ([1] if add_special else []) + [b + 3 for b in text.encode()]

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The inverse of :meth:`tokenize` (special tokens render as nothing)."""
        toks = self._tokens(tokens, "tokens")
        return bytes(t - 3 for t in toks if t >= 3).decode("utf-8", "replace")

    def token_piece(self, token: int) -> bytes:
        """The byte of ``token`` (special tokens: nothing)."""
        (t,) = self._tokens([token], "token")
        return bytes([t - 3]) if t >= 3 else b""

    def is_eog(self, token: int) -> bool:
        """EOS is token 2."""
        return token == 2

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], template: str | None = None,
                            add_assistant: bool = True) -> str:
        """A ChatML-like rendering."""
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise errors.InvalidContent(f"messages[{i}] must have str role and content")
            out.append(f"<{m['role']}>{m['content']}</{m['role']}>\n")
        return "".join(out) + ("<assistant>" if add_assistant else "")

    def _next_logits(self, ctx: list[int]) -> np.ndarray:
        logits = np.zeros(self.n_vocab, dtype=np.float32)
        nxt = (sum(ctx[-3:]) * 31 + len(ctx)) % (self.n_vocab - 3) + 3
        logits[nxt] = 10.0
        logits[(nxt * 7) % (self.n_vocab - 3) + 3] += 5.0
        return logits

    def step(self, rows: Iterable[tuple[Any, ...]]) -> list[int]:
        """Append each row to its sequence, after the native binding's checks."""
        self._alive()
        plan, seen, total = [], set(), 0
        for row in rows:
            seq = self._seq(row[0])
            if seq in seen:
                raise errors.InvalidParameter(f"seq_id {seq} appears twice in one step")
            toks = self._tokens(row[1], f"tokens of seq {seq}")
            if not toks:
                raise errors.EmptyPrompt(f"the row for seq {seq} holds no tokens")
            total += len(toks)
            if total > self.n_batch:
                raise errors.BatchOverflow(f"step holds {total} tokens or more, over n_batch={self.n_batch}")
            if len(self._seqs[seq]) + len(toks) > self.n_ctx_seq:
                raise errors.ContextOverflow(f"seq {seq} holds {len(self._seqs[seq])} positions; "
                                             f"{len(toks)} more exceed its context of {self.n_ctx_seq}")
            seen.add(seq)
            plan.append((seq, toks, row[2] if len(row) > 2 else True))
        if not plan:
            return []
        if self._abort:
            raise errors.Aborted(f"decode of {total} tokens was aborted")
        self._logits = {}
        out = []
        for seq, toks, want in plan:
            self._seqs[seq].extend(toks)
            if want:
                self._logits[seq] = self._next_logits(self._seqs[seq])
                out.append(seq)
        self.steps += 1
        return out

    def logits(self, seq_id: int, out: np.ndarray | None = None) -> np.ndarray:
        """Copy of the last step's logits of ``seq_id``."""
        seq = self._seq(seq_id)
        if seq not in self._logits:
            raise errors.NoLogits(f"seq {seq} produced no logits in the last step")
        if out is None:
            return self._logits[seq].copy()
        out[:] = self._logits[seq]
        return out

    def new_sampler(self, params: dict[str, Any]) -> _Sampler:
        """Greedy, or softmax sampling with a seeded generator."""
        return _Sampler(params)

    def sample_logits(self, sampler: _Sampler, logits: np.ndarray) -> int:
        """Sample from a logits buffer."""
        if sampler.freed:
            raise errors.Released("sampler was freed")
        logits = np.asarray(logits, dtype=np.float64)
        if logits.shape != (self.n_vocab,):
            raise errors.InvalidParameter(f"logits hold {logits.size} values, expected n_vocab={self.n_vocab}")
        if sampler.temperature == 0:
            return int(np.argmax(logits))
        p = np.exp((logits - logits.max()) / sampler.temperature)
        return int(sampler.rng.choice(self.n_vocab, p=p / p.sum()))

    def sample(self, sampler: _Sampler, seq_id: int) -> int:
        """Sample from the last step's logits of ``seq_id``."""
        return self.sample_logits(sampler, self.logits(seq_id))

    def free_sampler(self, sampler: _Sampler) -> None:
        """Release a sampler."""
        sampler.freed = True

    def state_get(self, seq_id: int) -> bytes:
        """The tokens of ``seq_id`` as a blob."""
        toks = self._seqs[self._seq(seq_id)]
        return _MAGIC + struct.pack(f"<I{len(toks)}I", len(toks), *toks)

    def state_set(self, seq_id: int, data: Any) -> int:
        """Restore a blob from :meth:`state_get`."""
        seq = self._seq(seq_id)
        blob = bytes(data)
        self._seqs[seq] = []
        self._logits.pop(seq, None)
        if blob[:4] != _MAGIC or len(blob) < 8:
            raise errors.StateError(f"not a stub state blob for seq {seq}")
        (n,) = struct.unpack_from("<I", blob, 4)
        if len(blob) != 8 + 4 * n or n > self.n_ctx_seq:
            raise errors.StateError(f"bad stub state blob for seq {seq}")
        self._seqs[seq] = list(struct.unpack_from(f"<{n}I", blob, 8))
        return n

    def seq_clear(self, seq_id: int) -> None:
        """Empty ``seq_id``."""
        seq = self._seq(seq_id)
        self._seqs[seq] = []
        self._logits.pop(seq, None)

    def n_past(self, seq_id: int) -> int:
        """Positions ``seq_id`` holds."""
        return len(self._seqs[self._seq(seq_id)])

    def seq_copy(self, src: int, dst: int) -> int:
        """Copy ``src``'s tokens to ``dst`` (only with resident sequences, as the binding)."""
        s, d = self._seq(src), self._seq(dst)
        if s == d:
            raise errors.InvalidParameter(f"seq_copy needs two different sequences, got {s} twice")
        if not self.resident_seqs:
            raise errors.NotSupported("seq_copy needs resident sequences (a kv_unified context)")
        self._seqs[d] = list(self._seqs[s])
        self._logits.pop(d, None)
        return len(self._seqs[d])

    def embed(self, tokens: Sequence[int], normalize: bool = True) -> np.ndarray:
        """A deterministic vector from the token ids (the generation sequences are untouched)."""
        self._alive()
        toks = self._tokens(tokens, "tokens")
        if not toks:
            raise errors.EmptyPrompt("cannot embed an empty token list")
        out = np.zeros(self.n_embd, dtype=np.float32)
        for i, t in enumerate(toks):
            out[(t * 7 + i) % self.n_embd] += 1.0
        if normalize:
            out /= np.float32(np.linalg.norm(out))
        return out

    def load_adapter(self, path: str) -> Any:
        """A handle naming ``path`` (the stub reads nothing)."""
        self._alive()
        return {"path": str(path)}

    def set_adapters(self, adapters: Sequence[tuple[Any, float]]) -> None:
        """Remember the applied set (the stub's logits ignore it)."""
        self._alive()
        self.adapters = list(adapters)

    def free_adapter(self, adapter: Any) -> None:
        """Nothing to free."""

    def request_abort(self) -> None:
        """The next step raises ``Aborted``."""
        self._abort = True

    def clear_abort(self) -> None:
        """Steps run again."""
        self._abort = False

    def close(self) -> None:
        """Mark closed (idempotent)."""
        self.closed = True
