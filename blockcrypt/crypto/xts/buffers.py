"""Addresses of Python buffers for C calls: CPython's ``Py_buffer`` (to read the
address of a read-only buffer, which ctypes' ``from_buffer`` refuses) and the
ctypes helpers bound once for the hot path.

Owns only these bindings to the documented CPython buffer API.
"""
from __future__ import annotations

import ctypes


class PyBuffer(ctypes.Structure):
    """CPython's Py_buffer (stable layout since 3.3)."""
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p),
                ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_void_p), ("shape", ctypes.c_void_p),
                ("strides", ctypes.c_void_p), ("suboffsets", ctypes.c_void_p),
                ("internal", ctypes.c_void_p)]


# Read-only buffers have no ctypes from_buffer(): take their address through the
# C API (PyDLL: called with the GIL held).
PyObject_GetBuffer = ctypes.pythonapi.PyObject_GetBuffer
PyObject_GetBuffer.argtypes = [ctypes.py_object, ctypes.c_void_p, ctypes.c_int]
PyObject_GetBuffer.restype = ctypes.c_int
PyBuffer_Release = ctypes.pythonapi.PyBuffer_Release
PyBuffer_Release.argtypes = [ctypes.c_void_p]
PyBuffer_Release.restype = None
PYBUF_SIMPLE = 0

# Bound once: saves attribute lookups on every request.
addressof = ctypes.addressof
char_from_buffer = ctypes.c_char.from_buffer
