"""attnkern: fused attention kernels for vision models in computational pathology.

Public names: :class:`CBAM`, :class:`SqueezeExcite`, :class:`BAM`, :class:`Attention`, :func:`convert`,
:func:`scaled_dot_product_attention`, :mod:`attnkern.explain`, and the functional API in
:mod:`attnkern.functional`.
"""
from . import functional
from .functional import bam, cbam, scaled_dot_product_attention, squeeze_excite
from . import explain
from .nn import BAM, CBAM, Attention, SqueezeExcite, convert

__version__ = "0.1.0"

__all__ = ["Attention", "BAM", "CBAM", "SqueezeExcite", "convert", "bam", "cbam", "scaled_dot_product_attention", "squeeze_excite", "functional", "explain",
           "__version__"]
