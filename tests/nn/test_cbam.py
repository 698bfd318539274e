"""attnkern.CBAM as a drop-in: timm's arguments and state_dict keys, the authors' keys, errors."""
import copy

import pytest
import torch
from timm.layers.cbam import CbamModule

import attnkern
from attnkern.nn import CBAM, cbam_state_dict_from_authors
from tests.tolerance import assert_close


@pytest.mark.parametrize("kwargs", [
    {},
    dict(rd_ratio=1 / 8, rd_divisor=8),
    dict(rd_channels=7, spatial_kernel_size=3, mlp_bias=True),
    dict(act_layer=torch.nn.SiLU),
])
def test_timm_checkpoint_loads_strict(kwargs):
    timm_m = CbamModule(72, **kwargs)
    ours = CBAM(72, **kwargs)
    assert list(ours.state_dict().keys()) == list(timm_m.state_dict().keys())
    ours.load_state_dict(timm_m.state_dict(), strict=True)
    back = CbamModule(72, **kwargs)
    back.load_state_dict(ours.state_dict(), strict=True)


def test_timm_defaults_match():
    import inspect

    ours = inspect.signature(CBAM).parameters
    theirs = inspect.signature(CbamModule).parameters
    for name, p in theirs.items():
        if name in ("device", "dtype"):
            continue
        assert name in ours, name
        assert ours[name].default == p.default, name


def _authors_state_dict(C, r=16, prefix="layer1.0.cbam."):
    """A state_dict with the CBAM authors' key names and shapes (Linear MLP with biases,
    BasicConv spatial conv + BatchNorm)."""
    g = torch.Generator().manual_seed(0)
    h = C // r
    sd = {
        "ChannelGate.mlp.1.weight": torch.randn(h, C, generator=g),
        "ChannelGate.mlp.1.bias": torch.randn(h, generator=g),
        "ChannelGate.mlp.3.weight": torch.randn(C, h, generator=g),
        "ChannelGate.mlp.3.bias": torch.randn(C, generator=g),
        "SpatialGate.spatial.conv.weight": torch.randn(1, 2, 7, 7, generator=g) * 0.1,
        "SpatialGate.spatial.bn.weight": torch.tensor([1.2]),
        "SpatialGate.spatial.bn.bias": torch.tensor([0.1]),
        "SpatialGate.spatial.bn.running_mean": torch.tensor([0.05]),
        "SpatialGate.spatial.bn.running_var": torch.tensor([0.9]),
        "SpatialGate.spatial.bn.num_batches_tracked": torch.tensor(10),
    }
    return {prefix + k: v for k, v in sd.items()}


def test_authors_state_dict_maps_and_computes_their_math():
    C = 64
    sd = _authors_state_dict(C)
    mapped = cbam_state_dict_from_authors(sd)
    ours = CBAM(C, mlp_bias=True, pool_order="max_mean", bn_momentum=0.01).eval()
    ours.load_state_dict({k[len("layer1.0.cbam."):]: v for k, v in mapped.items()}, strict=True)

    # The authors' math, written out from their module's description.
    raw = {k[len("layer1.0.cbam."):]: v for k, v in sd.items()}
    x = torch.randn(2, C, 9, 7)

    def mlp(v):
        h = torch.relu(v @ raw["ChannelGate.mlp.1.weight"].T + raw["ChannelGate.mlp.1.bias"])
        return h @ raw["ChannelGate.mlp.3.weight"].T + raw["ChannelGate.mlp.3.bias"]

    gc = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[:, :, None, None]
    y = x * gc
    pooled = torch.cat([y.amax(1, keepdim=True), y.mean(1, keepdim=True)], 1)
    s = torch.nn.functional.conv2d(pooled, raw["SpatialGate.spatial.conv.weight"], padding=3)
    s = torch.nn.functional.batch_norm(s, raw["SpatialGate.spatial.bn.running_mean"],
                                       raw["SpatialGate.spatial.bn.running_var"],
                                       raw["SpatialGate.spatial.bn.weight"], raw["SpatialGate.spatial.bn.bias"],
                                       False, 0.01, 1e-5)
    expected = y * torch.sigmoid(s)
    assert_close(ours(x), expected, name="authors' CBAM")


def test_bad_input_errors():
    m = CBAM(24)
    with pytest.raises(ValueError, match=r"x must be a 4-D tensor \[B, C, H, W\], got 3-D"):
        m(torch.randn(24, 7, 7))
    with pytest.raises(ValueError, match="x has 16 channels but the module was built for 24"):
        m(torch.randn(2, 16, 7, 7))
    with pytest.raises(TypeError, match="x must be float32, bfloat16, float16 or float64, got torch.int64"):
        m(torch.ones(2, 24, 7, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must not be empty, got shape \(0, 24, 7, 7\)"):
        m(torch.randn(0, 24, 7, 7))
    with pytest.raises(ValueError, match="x is on meta but the module's parameters are on cpu"):
        m(torch.randn(2, 24, 7, 7, device="meta"))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        m([1.0])
    with pytest.raises(ValueError, match="pool_order"):
        CBAM(24, pool_order="avg_max")
    with pytest.raises(ValueError, match="spatial_kernel_size must be odd"):
        CBAM(24, spatial_kernel_size=4)


def test_batchnorm_train_on_single_value_gives_its_own_error():
    m = CBAM(24).train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        m(torch.randn(1, 24, 1, 1))


def test_convert_standalone_module_and_keeps_mode_and_dtype():
    timm_m = CbamModule(32).eval().double()
    conv = attnkern.convert(copy.deepcopy(timm_m))
    assert isinstance(conv, CBAM) and not conv.training
    assert conv.channel.fc1.weight.dtype == torch.float64
    x = torch.randn(2, 32, 5, 6, dtype=torch.float64)
    assert_close(conv(x), timm_m(x), name="out")
