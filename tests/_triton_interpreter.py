"""Test-harness shim: Triton's interpreter rounds float32 -> bfloat16 casts to nearest even.

Without a GPU the Triton kernels run under ``TRITON_INTERPRET=1``. Triton 3.8's interpreter
converts float32 to bfloat16 by truncating the mantissa (``InterpreterBuilder.cast_impl``
passes no rounding mode to its bit-level converter, and that converter's "round to nearest
even" branch rounds half up without carrying into the exponent), while compiled Triton, like
torch, rounds to nearest even. About half of all casts then differ from a GPU's by one bfloat16
ulp, all towards zero, so bf16 tolerances would measure the emulator instead of the kernels
(the attention kernels round P and dS to bfloat16 before each product).

This module, imported once by the root ``conftest.py``, replaces the interpreter's float32 ->
bfloat16 conversion by torch's (round to nearest even, NaN and infinities kept), for plain casts
(``.to(tl.bfloat16)``) and for ``fp_to_fp`` casts that ask for round-to-nearest-even or no
mode. Every other cast is left to the interpreter. It lives in the tests only: the package
never patches Triton. It does nothing when the interpreter is off or Triton is missing.
"""
from __future__ import annotations

import os

import numpy as np
import torch


def _f32_to_bf16_bits(data: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16, as the interpreter stores bfloat16) of float32 data,
    rounded to nearest even by torch."""
    a = np.ascontiguousarray(data, dtype=np.float32)
    bits = torch.from_numpy(a.reshape(-1)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return bits.reshape(a.shape)


def install() -> bool:
    """Patch the interpreter's builder (idempotent); True if it is patched."""
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return False
    try:
        import triton.language as tl
        from triton._C.libtriton import ir
        from triton.runtime import interpreter as interp
    except ImportError:
        return False
    builder = interp.InterpreterBuilder
    if getattr(builder, "_rne_bf16_casts", False):
        return True
    cast_impl, fp_to_fp = builder.cast_impl, builder.create_fp_to_fp

    def is_f32_to_bf16(src, dst_type) -> bool:
        return src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16

    def rne_cast_impl(self, src, dst_type):
        if is_f32_to_bf16(src, dst_type):
            return interp.TensorHandle(_f32_to_bf16_bits(src.data), dst_type.scalar)
        return cast_impl(self, src, dst_type)

    def rne_fp_to_fp(self, src, dst_type, rounding_mode):
        if is_f32_to_bf16(src, dst_type) and rounding_mode in (None, ir.ROUNDING_MODE.RTNE):
            return interp.TensorHandle(_f32_to_bf16_bits(src.data), dst_type.scalar)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    builder.cast_impl = rne_cast_impl
    builder.create_fp_to_fp = rne_fp_to_fp
    builder._rne_bf16_casts = True
    return True


INSTALLED = install()
