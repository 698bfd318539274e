"""attnkern: fused attention kernels for vision models in computational pathology.

Public names: :class:`CBAM`, :class:`SqueezeExcite`, :class:`BAM`, :class:`Attention`, :func:`convert`,
:func:`scaled_dot_product_attention`, :mod:`attnkern.explain`, the functional API in
:mod:`attnkern.functional`, and :func:`cpu_output_cache_info` / :func:`empty_cpu_output_cache`
(the C++ kernels' cache of big output blocks).
"""
from . import functional
from .functional import bam, cbam, scaled_dot_product_attention, squeeze_excite
from . import explain
from .nn import BAM, CBAM, Attention, SqueezeExcite, convert
from ._cpu import empty_output_cache as empty_cpu_output_cache
from ._cpu import output_cache_info as cpu_output_cache_info

__version__ = "0.1.0"

__all__ = ["Attention", "BAM", "CBAM", "SqueezeExcite", "convert", "bam", "cbam", "scaled_dot_product_attention", "squeeze_excite", "functional", "explain",
           "cpu_output_cache_info", "empty_cpu_output_cache", "__version__"]
