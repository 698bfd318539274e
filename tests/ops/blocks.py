"""Shared by the block tests: run a module forward and backward, and build the two references
of the tolerance rule (tests/tolerance.py) for a dtype."""
import copy

import torch

from tests.tolerance import GradTerms, assert_close, term_error_bounds


def _leaf_like(x):
    """A leaf copy of ``x`` with x's own strides, also for a non-dense view (``clone`` would
    make such a view dense, and the kernels' handling of views would go untested)."""
    leaf = torch.empty_strided(x.size(), x.stride(), dtype=x.dtype, device=x.device)
    with torch.no_grad():
        leaf.copy_(x)
    return leaf.requires_grad_()


def run(module, x, g):
    """Output and [dx, *parameter grads] of ``module`` on ``x`` with upstream gradient ``g``."""
    x = _leaf_like(x)
    out = module(x)
    out.backward(g)
    return out, [x.grad] + [p.grad for p in module.parameters()]


def references(ref_module, x, g, dtype):
    """(high, same, terms): runs of the fp32 reference module in the higher precision (float64
    for float32 inputs, float32 for half inputs) and in ``dtype`` itself (None for float64), and
    the summed term errors of the same-dtype run's parameter gradients (tests/tolerance.py)."""
    hi_dtype = torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32
    hi_module = copy.deepcopy(ref_module).to(hi_dtype)
    rec_hi = GradTerms(hi_module)
    high = run(hi_module, x.to(hi_dtype), g.to(hi_dtype))
    if dtype == torch.float64:
        return high, None, {}
    same_module = copy.deepcopy(ref_module).to(dtype)
    rec_same = GradTerms(same_module)
    same = run(same_module, x, g)
    return high, same, term_error_bounds(rec_hi, rec_same)


def compare(ours, ref_module, x, g, dtype, param_names):
    """Run ``ours`` and check output and every gradient against ``ref_module``'s references."""
    out, grads = run(ours, x, g)
    (h_out, h_grads), same, terms = references(ref_module, x, g, dtype)
    s_out, s_grads = same if same is not None else (None, [None] * len(h_grads))
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, h_out, s_out, dtype=dtype, name="out")
    scale = max(float(gr.abs().max()) for gr in h_grads[1:]) if len(h_grads) > 1 else 0.0
    assert_close(grads[0], h_grads[0], s_grads[0], dtype=dtype, grad=True, name="dx")
    for i, name in enumerate(param_names, start=1):
        assert_close(grads[i], h_grads[i], s_grads[i], dtype=dtype, grad=True, name=name, scale=scale,
                     terms=terms.get(name))
    return out
