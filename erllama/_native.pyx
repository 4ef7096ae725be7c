# cython: language_level=3
"""The one compiled module of erllama: a thin, safe binding to llama.cpp.

Every llama.cpp pointer lives in a wrapper (:class:`Model`, :class:`Context`,
:class:`Sampler`, :class:`Adapter`) that holds a lock, NULLs the pointer on free and raises
:class:`erllama.errors.Released` afterwards. A model outlives its contexts, samplers and
adapters: freeing it while they live defers the free to the last of them. Inputs are
checked before llama.cpp sees them, C++ exceptions are converted at the call site, and the
GIL is released around decode, state copies, model loads and long tokenizations.

Only ``erllama.backend.llama`` should import this module.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.math cimport isfinite, sqrt
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from libcpp cimport bool as cbool
from libcpp.string cimport string
from libcpp.vector cimport vector

from erllama.includes cimport llama as L

import atexit
import errno
import logging
import os
import stat
import threading
import warnings

import numpy as np

from erllama import errors

include "handles/log.pxi"
include "handles/util.pxi"
include "handles/model.pxi"
include "handles/context.pxi"
include "handles/sampler.pxi"
include "handles/adapter.pxi"
