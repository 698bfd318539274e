"""attnkern: fused attention kernels for vision models in computational pathology.

Public names: :class:`CBAM`, :class:`SqueezeExcite`, :class:`BAM`, :func:`convert`, and the functional API in
:mod:`attnkern.functional`.
"""
from . import functional
from .functional import bam, cbam, squeeze_excite
from .nn import BAM, CBAM, SqueezeExcite, convert

__version__ = "0.1.0"

__all__ = ["BAM", "CBAM", "SqueezeExcite", "convert", "bam", "cbam", "squeeze_excite", "functional",
           "__version__"]
