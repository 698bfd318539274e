"""attnkern: fused attention kernels for vision models in computational pathology.

Public names: :class:`CBAM`, :func:`convert`, and the functional API in
:mod:`attnkern.functional`.
"""
from . import functional
from .functional import cbam
from .nn import CBAM, convert

__version__ = "0.1.0"

__all__ = ["CBAM", "convert", "cbam", "functional", "__version__"]
