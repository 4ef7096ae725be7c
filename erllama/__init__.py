"""erllama: llama.cpp in an OTP-style supervision tree, with a token-exact KV-state cache."""

from erllama import errors

__version__ = "0.1.0"

__all__ = ["errors", "__version__"]
