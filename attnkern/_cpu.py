"""Loads the compiled C++ extension (``attnkern._C``). The one place that imports it."""
from __future__ import annotations

from types import ModuleType
from typing import Optional

_ext: Optional[ModuleType] = None
_error: Optional[BaseException] = None
_tried = False


def extension() -> Optional[ModuleType]:
    """The extension module, or None when it is not built (see :func:`load_error`)."""
    global _ext, _error, _tried
    if not _tried:
        _tried = True
        try:
            import torch  # noqa: F401  (the extension links against torch's libraries)
            from attnkern import _C  # type: ignore[attr-defined]

            _ext = _C
        except ImportError as e:  # not built, or built against another torch
            _error = e
    return _ext


def load_error() -> Optional[BaseException]:
    extension()
    return _error


def require() -> ModuleType:
    ext = extension()
    if ext is None:
        raise RuntimeError(
            "attnkern's C++ extension is not built or failed to load "
            f"({_error}); build it with `pip install --no-build-isolation -e .` "
            "from the project root, or set ATTNKERN_BACKEND=reference"
        )
    return ext
