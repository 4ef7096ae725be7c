"""``response_format`` as a GBNF grammar for the sampler.

``json_object`` is llama.cpp's JSON grammar and ``json_schema`` goes through the
JSON-schema-to-GBNF converter of the pinned llama-cpp-python sdist (``llama_grammar.py``,
MIT, llama-cpp-python's port of llama.cpp's own ``json_schema_to_grammar.py``), copied into
``erllama/_vendor`` by the build. Chosen over llguidance because it is the converter
llama.cpp maintains for exactly this sampler, it ships in the source the build already
pins and verifies, and it is pure Python: no second native dependency.
"""

from __future__ import annotations

import json
from typing import Any

from erllama.server.errors import APIError, bad

__all__ = ["grammar_for"]


def _converter() -> Any:
    try:
        from erllama._vendor import llama_grammar
    except ImportError:
        raise APIError(501, "response_format needs the JSON grammar converter, which this build lacks "
                            "(erllama/_vendor/llama_grammar.py is written by setup.py; reinstall)",
                       type="not_supported_error", param="response_format") from None
    return llama_grammar


def grammar_for(fmt: dict[str, Any] | None) -> str | None:
    """The grammar of a checked ``response_format`` (None: free text)."""
    if fmt is None:
        return None
    conv = _converter()
    if fmt["type"] == "json_object":
        return str(conv.JSON_GBNF)
    schema = fmt["json_schema"].get("schema", {})
    try:
        return str(conv.json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter raises plain exceptions on schemas it cannot express
        raise bad(f"response_format.json_schema.schema cannot be turned into a grammar: {exc}",
                  "response_format.json_schema") from None
