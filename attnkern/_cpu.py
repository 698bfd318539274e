"""Loads the compiled C++ extension (``attnkern._C``). The one place that imports it.

``ATTNKERN_EXTENSION_DIR`` loads the module from another build instead (the sanitizer build of
CMakeLists.txt: see scripts/sanitize.sh).
"""
from __future__ import annotations

import glob
import importlib.util
import os
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

            folder = os.environ.get("ATTNKERN_EXTENSION_DIR")
            if folder:
                found = sorted(glob.glob(os.path.join(folder, "_C*.so")))
                if not found:
                    raise ImportError(f"no _C*.so in ATTNKERN_EXTENSION_DIR={folder}")
                spec = importlib.util.spec_from_file_location("attnkern._C", found[0])
                _ext = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(_ext)
            else:
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
