"""The llama.cpp backend: the only module that imports the compiled ``erllama._native``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from erllama import _native as native
from erllama import errors
from erllama.checksum import crc32c

__all__ = ["LlamaBackend", "Vocab", "context_shape", "crc32c", "native"]


def context_shape(config: Any) -> dict[str, Any]:
    """The native context's ``n_ctx``, ``n_seq_max`` and ``kv_unified`` for a model config,
    and the per-sequence size ``n_ctx_seq`` the model actor enforces.

    Without the resident tier: ``n_ctx`` split between ``n_seq_max`` streams, as asked. With
    it (``resident_seqs > 0``): one unified stream (a copy within a stream shares cells,
    across streams llama.cpp moves whole buffers and asserts on partial ranges) holding the
    working sequences' ``n_ctx`` plus the tier's ``resident_tokens``, so spare sequences
    never take a working sequence's room, and a full-size sliding-window cache (``swa_full``)."""
    per_seq = max(1, config.n_ctx // config.n_seq_max)
    r = getattr(config, "resident_seqs", 0)
    if not r:
        return {"n_ctx": config.n_ctx, "n_seq_max": config.n_seq_max, "kv_unified": False, "n_ctx_seq": per_seq,
                "swa_full": config.swa_full}
    # a unified sliding-window cache holds n_swa cells per sequence plus one ubatch, less
    # than sequences that share cells and prefill at once can need: full size, like the rest
    return {"n_ctx": per_seq * config.n_seq_max + config.resident_budget(), "n_seq_max": config.n_seq_max + r,
            "kv_unified": True, "n_ctx_seq": per_seq, "swa_full": True}


class Vocab:
    """A model's vocabulary and chat template, without weights or a context (loaded
    ``vocab_only``: milliseconds and a few MB), for tokenizing away from the model actor,
    as a router does. ``chat_template`` is the fallback for a model that has none."""

    def __init__(self, path: str | os.PathLike[str], chat_template: str | None = None) -> None:
        self.model = native.Model.load(path, vocab_only=True)
        self.chat_template = chat_template

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Text to token ids."""
        return self.model.tokenize(text, add_special, parse_special)

    def detokenize(self, tokens: Sequence[int]) -> str:
        """Token ids to text."""
        return self.model.detokenize(tokens)

    def token_piece(self, token: int) -> bytes:
        """The bytes one token renders as."""
        return self.model.token_to_piece(token)

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens."""
        return self.model.is_eog(token)

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], template: str | None = None,
                            add_assistant: bool = True) -> str:
        """The model's template, else ``template``, else the configured fallback."""
        tmpl = template or self.model.chat_template() or self.chat_template
        if tmpl is None:
            raise errors.NoChatTemplate(f"model {self.model.path!r} has no chat template and none was configured")
        return native.apply_chat_template(tmpl, messages, add_assistant)

    def close(self) -> None:
        """Free the native model (idempotent)."""
        self.model.free()


class LlamaBackend(Vocab):
    """A model and one context on the native binding (see ``backend.protocol.Backend``)."""

    def __init__(self, path: str | os.PathLike[str], config: Any) -> None:
        self.model = native.Model.load(path, n_gpu_layers=config.n_gpu_layers)
        shape = context_shape(config)
        if shape["kv_unified"] and self.model.is_recurrent:
            self.model.free()
            raise errors.NotSupported(f"resident_seqs needs an attention KV cache; {str(path)!r} is a recurrent "
                                      f"or hybrid model (load it with resident_seqs=0)")
        try:
            self.ctx = native.Context.create(
                self.model, n_ctx=shape["n_ctx"], n_batch=config.n_batch, n_ubatch=config.n_ubatch,
                n_seq_max=shape["n_seq_max"], n_threads=config.n_threads, type_k=config.type_k,
                type_v=config.type_v, flash_attn=config.flash_attn, swa_full=shape["swa_full"],
                kv_unified=shape["kv_unified"])
        except BaseException:
            self.model.free()
            raise
        self.chat_template = config.chat_template
        self.ftype_name = self.model.ftype_name
        self.n_vocab = self.model.n_vocab
        self.n_seq_max = config.n_seq_max
        self.resident_seqs = tuple(range(config.n_seq_max, self.ctx.n_seq_max))
        # with the resident tier the stream is shared: each working sequence keeps its own
        # share of n_ctx, so the spare sequences' budget never takes room from it
        self.n_ctx_seq = self.ctx.n_ctx_seq if not self.resident_seqs else shape["n_ctx_seq"]
        self.n_batch = self.ctx.n_batch
        self.n_embd = self.model.n_embd
        self._config = config
        self._embed_ctx: native.Context | None = None
        self._adapters: list[native.Adapter] = []
        self._adapters_applied: list[tuple[native.Adapter, float]] = []

    def step(self, rows: Iterable[tuple[Any, ...]]) -> list[int]:
        """One decode of several sequences' rows."""
        return self.ctx.step(rows)

    def logits(self, seq_id: int, out: np.ndarray | None = None) -> np.ndarray:
        """Copy of the last-token logits."""
        return self.ctx.logits(seq_id, out)

    def new_sampler(self, params: dict[str, Any]) -> native.Sampler:
        """A sampler chain for one request."""
        return native.Sampler(self.model, **params)

    def sample(self, sampler: native.Sampler, seq_id: int) -> int:
        """Sample from the last step's logits of ``seq_id``."""
        return sampler.sample(self.ctx, seq_id)

    def sample_logits(self, sampler: native.Sampler, logits: np.ndarray) -> int:
        """Sample from stored logits."""
        return sampler.sample_logits(logits)

    def free_sampler(self, sampler: native.Sampler) -> None:
        """Release a sampler."""
        sampler.free()

    def state_get(self, seq_id: int) -> bytes:
        """The KV state of ``seq_id``."""
        return self.ctx.state_get(seq_id)

    def state_get_parked(self, seq_id: int) -> bytes:
        """The state of a spare sequence, copied while decodes of others run (any thread)."""
        return self.ctx.state_get_parked(seq_id)

    def state_size(self, seq_id: int) -> int:
        """Bytes :meth:`state_get` of ``seq_id`` would return."""
        return self.ctx.state_size(seq_id)

    def state_set(self, seq_id: int, data: Any) -> int:
        """Restore a state; returns the positions restored."""
        return self.ctx.state_set(seq_id, data)

    def seq_clear(self, seq_id: int) -> None:
        """Empty ``seq_id``."""
        self.ctx.seq_clear(seq_id)

    def n_past(self, seq_id: int) -> int:
        """Positions ``seq_id`` holds."""
        return self.ctx.n_past(seq_id)

    def seq_copy(self, src: int, dst: int) -> int:
        """Share ``src``'s cells with ``dst`` (kv_unified: no data moves)."""
        return self.ctx.seq_copy(src, dst)

    def embed(self, tokens: Sequence[int], normalize: bool = True) -> np.ndarray:
        """Pooled embedding on a dedicated embeddings context (created on first use, one
        sequence of the generation context's per-sequence size, whole input in one ubatch)."""
        if self._embed_ctx is None:
            cfg = self._config
            n = self.n_ctx_seq
            self._embed_ctx = native.Context.create(
                self.model, n_ctx=n, n_batch=n, n_ubatch=n, n_seq_max=1, n_threads=cfg.n_threads,
                embeddings=True, pooling=getattr(cfg, "pooling", "unspecified"), type_k=cfg.type_k,
                type_v=cfg.type_v, flash_attn=cfg.flash_attn, swa_full=cfg.swa_full)
            if self._adapters_applied:
                self._embed_ctx.set_adapters(self._adapters_applied)
        return self._embed_ctx.embed(tokens, 0, normalize)

    def load_adapter(self, path: str) -> native.Adapter:
        """Load a LoRA adapter file (not applied until :meth:`set_adapters`)."""
        adapter = native.Adapter.load(self.model, path)
        self._adapters.append(adapter)
        return adapter

    def set_adapters(self, adapters: Sequence[tuple[native.Adapter, float]]) -> None:
        """Apply exactly these adapters, to the generation and the embeddings contexts."""
        pairs = list(adapters)
        self.ctx.set_adapters(pairs)
        if self._embed_ctx is not None:
            self._embed_ctx.set_adapters(pairs)
        self._adapters_applied = pairs

    def free_adapter(self, adapter: native.Adapter) -> None:
        """Release an adapter (idempotent)."""
        adapter.free()
        if adapter in self._adapters:
            self._adapters.remove(adapter)

    def request_abort(self) -> None:
        """Interrupt the running decode (any thread)."""
        self.ctx.request_abort()

    def clear_abort(self) -> None:
        """Let decodes run again."""
        self.ctx.clear_abort()

    def close(self) -> None:
        """Free the contexts, the adapters and the model (idempotent)."""
        if self._embed_ctx is not None:
            self._embed_ctx.free()
        self.ctx.free()
        for adapter in self._adapters:
            adapter.free()
        self._adapters.clear()
        self.model.free()
