"""attnkern: fused attention kernels for vision models in computational pathology.

Public names: :class:`CBAM`, :class:`SqueezeExcite`, :func:`convert`, and the functional API in
:mod:`attnkern.functional`.
"""
from . import functional
from .functional import cbam, squeeze_excite
from .nn import CBAM, SqueezeExcite, convert

__version__ = "0.1.0"

__all__ = ["CBAM", "SqueezeExcite", "convert", "cbam", "squeeze_excite", "functional", "__version__"]
