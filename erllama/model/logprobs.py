"""The log-probabilities a request asks for (``logprobs``): of each generated token and of
its most likely alternatives, from the logits the token was sampled from."""

from __future__ import annotations

from typing import Any

import numpy as np

from erllama.model.request import Request
from erllama.types import TokenLogprobs

__all__ = ["token_logprobs"]


def token_logprobs(backend: Any, req: Request, tok: int, logits: np.ndarray | None) -> TokenLogprobs:
    """``tok``'s log-probability under the raw distribution (before penalties, grammar and
    temperature) and the ``req.params.logprobs`` most likely tokens, from ``logits`` (an
    exact hit's stored ones) or the last step's logits of the request's sequence."""
    x = np.asarray(logits if logits is not None else backend.logits(req.state.seq_id), dtype=np.float64)
    peak = x.max()
    lse = peak + np.log(np.exp(x - peak).sum())
    k = req.params.logprobs or 0
    top: tuple[tuple[bytes, float], ...] = ()
    if k:
        idx = np.argpartition(-x, k - 1)[:k]
        idx = idx[np.argsort(-x[idx], kind="stable")]
        top = tuple((backend.token_piece(int(i)), float(x[i] - lse)) for i in idx)
    return TokenLogprobs(backend.token_piece(tok), float(x[tok] - lse), top)
