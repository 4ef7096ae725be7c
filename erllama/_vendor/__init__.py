"""Code copied out of the pinned llama-cpp-python sdist by the build (``setup.py``,
``vendor_grammar``), never committed: ``llama_grammar.py``, its JSON-schema-to-GBNF
converter (MIT; a port of llama.cpp's ``json_schema_to_grammar.py``). Not public API."""
