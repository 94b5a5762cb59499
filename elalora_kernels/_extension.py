"""Loads the compiled C++ CPU kernels (``elalora_kernels._C``) once.

The extension is built by ``setup.py``; when it could not be built (no
compiler) the CPU backend runs its vectorised torch fallback and says so with
one warning, the first time the extension is asked for. Setting
``ELALORA_NO_EXTENSION=1`` (also honoured by ``setup.py``) means the fallback is
wanted: no warning then.
"""
from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

_UNSET = object()
_loaded: object = _UNSET
_error: str | None = None


def load() -> ModuleType | None:
    """The ``_C`` module, or ``None`` (after one warning) when it is unavailable."""
    global _loaded, _error
    if _loaded is _UNSET:
        if os.environ.get("ELALORA_NO_EXTENSION") == "1":
            _loaded, _error = None, "disabled by ELALORA_NO_EXTENSION=1"
        else:
            try:
                _loaded = importlib.import_module(f"{__package__}._C")
            except ImportError as error:  # not built, or built against another torch
                _loaded, _error = None, str(error)
                warnings.warn(
                    "elalora: the C++ CPU extension elalora_kernels._C is not available "
                    f"({error}); using the slower vectorised torch fallback. To build it, reinstall with a C++ "
                    "compiler present: pip install -v --no-build-isolation --no-deps --force-reinstall "
                    "elalora (or -e . in a checkout); -v shows why a build fails.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _loaded  # type: ignore[return-value]


def available() -> bool:
    return load() is not None


def reason_unavailable() -> str | None:
    load()
    return _error
