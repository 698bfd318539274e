"""Mixed precision: under ``torch.autocast`` the fused modules follow autocast's rules as the
modules they replace do, and match them (forward and gradients) under tests/tolerance.py's
low-precision rule: ref32 is the reference module in float32 without autocast, ref_lowp the
same module under autocast.

What autocast does to a block: its small branches (the MLP's linear layers, the spatial convs)
run in the autocast dtype, as timm's do; the passes over the big tensor keep x's dtype (our ops
are reductions and elementwise products, autocast's "run in the input's dtype" kind) with float32
statistics and gates. So the output has x's dtype: float32 for a float32 x, as timm's
``x * gate`` promotes to float32, and the autocast dtype for an x made by an autocast conv.
"""
import copy

import pytest
import timm
import torch
from timm.layers.cbam import CbamModule
from timm.layers.squeeze_excite import SEModule

import attnkern
from attnkern.nn import BAM, CBAM, SqueezeExcite
from attnkern.reference import bam as bam_ref
from tests.tolerance import GradTerms, assert_close, term_error_bounds

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device (none here)"))]
# CPU autocast: bfloat16 (float16 CPU autocast exists but is not what CPU training uses);
# CUDA: both.
CASES = [("cpu", torch.bfloat16)] + [
    pytest.param("cuda", d, marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device (none here)"))
    for d in (torch.float16, torch.bfloat16)]
CASE_IDS = ["cpu-bf16", "cuda-fp16", "cuda-bf16"]


def _run(module, x, device, dtype, autocast: bool):
    """Output and gradients (of x and of the parameters) of sum(out * w) for a fixed w."""
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast(device, dtype=dtype, enabled=autocast):
        out = module(x)
    w = torch.linspace(-1, 1, out.numel(), device=device, dtype=torch.float32).view(out.shape)
    (out.float() * w).sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters()}
    return out, x.grad, grads


def _check(ours_mod, ref_mod, x, device, dtype):
    """ours under autocast vs ref_mod under autocast (ref_lowp) and ref_mod in float32 (ref32)."""
    ref32_mod = copy.deepcopy(ref_mod)
    lowp_mod = copy.deepcopy(ref_mod)
    rec32, rec_lowp = GradTerms(ref32_mod), GradTerms(lowp_mod)
    out, dx, grads = _run(ours_mod, x, device, dtype, True)
    out_l, dx_l, grads_l = _run(lowp_mod, x, device, dtype, True)
    out_32, dx_32, grads_32 = _run(ref32_mod, x.float(), device, dtype, False)
    assert out.dtype == out_l.dtype, f"output dtype {out.dtype}, the replaced module's {out_l.dtype}"
    assert dx.dtype == dx_l.dtype == x.dtype
    assert out.shape == out_32.shape
    assert_close(out, out_32, out_l, dtype=dtype, name="output")
    assert_close(dx, dx_32, dx_l, dtype=dtype, grad=True, name="grad x")
    assert grads.keys() == grads_32.keys()
    # relative to the largest gradient (scale=1.0 below adds one ulp of it to the floor): deep in
    # a bf16 network, gradients much smaller than the largest carry rounding noise of that size
    scale = max(g.abs().max().item() for g in grads_32.values())
    terms = term_error_bounds(rec32, rec_lowp)  # sums that cancel: bounded by their terms' errors
    for n in grads:
        assert grads[n].dtype == grads_32[n].dtype  # parameter gradients stay float32
        t = terms.get(n)
        assert_close(grads[n] / scale, grads_32[n] / scale, grads_l[n] / scale, dtype=dtype,
                     grad=True, name=f"grad {n}", scale=1.0, terms=None if t is None else t / scale)


@pytest.mark.parametrize("x_dtype", [torch.float32, "lowp"], ids=["x-fp32", "x-lowp"])
@pytest.mark.parametrize("kind", ["cbam", "se"])
@pytest.mark.parametrize("device,dtype", CASES, ids=CASE_IDS)
def test_block_matches_timm_under_autocast(kind, x_dtype, device, dtype):
    torch.manual_seed(0)
    ref = (CbamModule(64) if kind == "cbam" else SEModule(64)).to(device).train()
    ours = attnkern.convert(copy.deepcopy(ref))
    assert isinstance(ours, CBAM if kind == "cbam" else SqueezeExcite)
    x = torch.randn(2, 64, 9, 11, device=device).to(dtype if x_dtype == "lowp" else x_dtype)
    _check(ours, ref, x, device, dtype)


class _BamReference(torch.nn.Module):
    """The pure-PyTorch BAM with the branches (and parameter names) of a BAM module (there is
    no timm BAM)."""

    def __init__(self, m: BAM):
        super().__init__()
        self.channel, self.spatial, self.combine = m.channel, m.spatial, m.combine

    def forward(self, x):
        return bam_ref.bam(x, self.channel, self.spatial, combine=self.combine)[0]


@pytest.mark.parametrize("combine", ["sum", "product"])
@pytest.mark.parametrize("x_dtype", [torch.float32, "lowp"], ids=["x-fp32", "x-lowp"])
@pytest.mark.parametrize("device,dtype", CASES, ids=CASE_IDS)
def test_bam_matches_reference_under_autocast(x_dtype, combine, device, dtype):
    torch.manual_seed(0)
    ours = BAM(64, combine=combine).to(device).train()
    ref = _BamReference(copy.deepcopy(ours))
    x = torch.randn(2, 64, 10, 12, device=device).to(dtype if x_dtype == "lowp" else x_dtype)
    _check(ours, ref, x, device, dtype)


def _dtypes_of_blocks(model, classes):
    seen = []
    for m in model.modules():
        if isinstance(m, classes):
            m.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].dtype, out.dtype)))
    return seen


@pytest.mark.parametrize("attn", ["cbam", "se"])
@pytest.mark.parametrize("device,dtype", CASES, ids=CASE_IDS)
def test_converted_model_under_autocast(attn, device, dtype):
    """A converted timm ResNet under autocast: every block sees and returns what timm's block
    does (the autocast dtype, from the convolution before it), same logits and gradients.

    In eval mode: a training-mode BatchNorm over the last stage's 2x2 maps of a batch of 4
    normalises 16 values per channel, and a channel whose values nearly agree divides low
    precision noise by a near-zero deviation; which elements that hits depends on the rounding
    of each CPU's bf16 convolutions (oneDNN picks them by ISA: ``ONEDNN_MAX_CPU_ISA=AVX2`` on an
    AVX-512 machine reproduces an AVX2-only machine's). Every block's training-mode backward
    is compared under autocast in test_block_matches_timm_under_autocast, and the whole model's
    in float64 in tests/nn/test_convert.py."""
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False,
                            block_args=dict(attn_layer=attn)).to(device).eval()
    ours = attnkern.convert(copy.deepcopy(ref))
    our_cls = CBAM if attn == "cbam" else SqueezeExcite
    seen = _dtypes_of_blocks(ours, our_cls)
    x = torch.randn(4, 3, 64, 64, device=device)
    _check(ours, ref, x, device, dtype)
    assert len(seen) == 8 and seen == [(dtype, dtype)] * 8


@pytest.mark.parametrize("device,dtype", CASES, ids=CASE_IDS)
def test_block_dtypes_equal_timm_blocks_in_a_model(device, dtype):
    """Hooks on timm's and our blocks in the same model: same input and output dtypes, block by
    block, under autocast (and without: float32 throughout)."""
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False, num_classes=10,
                            block_args=dict(attn_layer="cbam")).to(device).eval()
    ours = attnkern.convert(copy.deepcopy(ref))
    seen_ref = _dtypes_of_blocks(ref, CbamModule)
    seen = _dtypes_of_blocks(ours, CBAM)
    x = torch.randn(1, 3, 64, 64, device=device)
    for enabled in (True, False):
        seen.clear(), seen_ref.clear()
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            y, y_ref = ours(x), ref(x)
        assert y.dtype == y_ref.dtype == (dtype if enabled else torch.float32)
        assert len(seen) == 8 and seen == seen_ref
