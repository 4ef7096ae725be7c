"""Backends a model actor drives: ``llama`` (the native binding), ``stub`` (tests), ``worker``."""
