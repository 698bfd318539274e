"""CAM (Zhou et al. 2016) against its definition and against Grad-CAM (the grad-cam package)
in float64: for a GAP + linear head Grad-CAM's map is CAM / (h * w), a positive scale."""
import pytest
import torch

from attnkern.explain import cam
from attnkern.explain.cam import CamRecorder


def _models():
    import timm
    import torchvision

    torch.manual_seed(0)
    return {
        "timm-resnet": timm.create_model("resnet10t", num_classes=3),
        "timm-cbam": timm.create_model("resnet18", num_classes=3, block_args=dict(attn_layer="cbam")),
        "timm-classifierhead": timm.create_model("regnetx_002", num_classes=3),
        "torchvision-resnet": torchvision.models.resnet18(num_classes=3),
    }


@pytest.fixture(scope="module")
def models():
    return {k: m.double().eval() for k, m in _models().items()}


@pytest.mark.parametrize("name", ["timm-resnet", "timm-cbam", "timm-classifierhead", "torchvision-resnet"])
def test_cam_is_the_definition_and_gradcam_up_to_a_positive_scale(models, name):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = models[name]
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    r = cam(model, x, target=torch.tensor([0, 2]))
    layer = model.get_submodule(r.layer)
    # the definition: M_c = sum_k W[c, k] A_k, from the layer's output in float64
    feats = {}
    h = layer.register_forward_hook(lambda m, a, o: feats.setdefault("a", o))
    with torch.no_grad():
        logits = model(x)
    h.remove()
    a = feats["a"]
    fc = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    ref = torch.einsum("bk,bkhw->bhw", fc.weight[[0, 2]], a)
    assert r.maps.dtype == torch.float64 and r.maps.shape == a.shape[:1] + a.shape[2:]
    torch.testing.assert_close(r.maps, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(r.logits, logits, rtol=0, atol=0)
    # spatial mean + bias is the logit (Zhou et al., eq. 2)
    torch.testing.assert_close(r.maps.mean((1, 2)) + fc.bias[[0, 2]], logits[[0, 1], [0, 2]], rtol=1e-12, atol=1e-12)
    # Grad-CAM of the same layer and classes, before its ReLU and normalisation
    targets = [ClassifierOutputTarget(0), ClassifierOutputTarget(2)]
    with GradCAM(model=model, target_layers=[layer]) as gc:
        gc(input_tensor=x, targets=targets)
        acts = gc.activations_and_grads.activations[0].numpy()
        grads = gc.activations_and_grads.gradients[0].numpy()
        grad_cam = torch.from_numpy(gc.get_cam_image(x, layer, targets, acts, grads))
    assert grad_cam.dtype == torch.float64
    hw = r.maps.shape[1] * r.maps.shape[2]
    scale = (grad_cam * r.maps).sum() / (r.maps * r.maps).sum()        # least-squares scale
    assert scale > 0
    torch.testing.assert_close(scale, torch.tensor(1.0 / hw, dtype=torch.float64), rtol=1e-10, atol=0)
    torch.testing.assert_close(grad_cam, r.maps * scale, rtol=1e-10, atol=1e-12)


def test_predicted_class_int_target_and_float32(models):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=4).eval()
    x = torch.randn(3, 3, 64, 64)
    r = cam(model, x)
    assert r.layer == "layer4" and r.maps.shape == (3, 2, 2) and r.maps.dtype == torch.float32
    assert torch.equal(r.target, r.logits.argmax(1))
    r3 = cam(model, x, target=3)
    assert r3.target.tolist() == [3, 3, 3]
    with pytest.raises(IndexError, match="out of range for 4 classes"):
        cam(model, x, target=4)
    with pytest.raises(TypeError, match="target must be None, an int or an integer tensor"):
        cam(model, x, target=1.5)
    assert not model.layer4._forward_hooks and not model.global_pool._forward_pre_hooks  # hooks removed


def test_refuses_heads_that_are_not_gap_plus_linear():
    import timm
    import torchvision

    cases = {
        "timm avg+max pooling": (timm.create_model("resnet10t", num_classes=2, global_pool="avgmax"), "pools with"),
        "timm MobileNetV3 (conv after pooling)": (timm.create_model("mobilenetv3_small_050", num_classes=2),
                                                   "one linear layer right after"),
        "torchvision MobileNetV3 (MLP head)": (torchvision.models.mobilenet_v3_small(num_classes=2),
                                               "one linear layer right after"),
        "timm ConvNeXt (norm after pooling)": (timm.create_model("convnext_atto", num_classes=2),
                                               "one linear layer right after"),
        "ViT (token pooling)": (timm.create_model("vit_tiny_patch16_224", num_classes=2, img_size=32),
                                "no global pooling module"),
        "no classifier": (timm.create_model("resnet10t", num_classes=0), "one linear layer right after"),
    }
    for what, (model, msg) in cases.items():
        with pytest.raises(ValueError, match=msg):
            cam(model.eval(), torch.randn(1, 3, 32, 32))


def test_refuses_a_head_that_does_something_the_modules_do_not_show():
    """A forward that scales the pooled features before the classifier: the structure looks
    like GAP + linear, the runtime check catches it."""
    import timm

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = timm.create_model("resnet10t", num_classes=2)

        def forward(self, x):
            f = self.net.forward_features(x)
            return self.net.fc(self.net.global_pool(f) * 2)

    with pytest.raises(ValueError, match="does not take the global average"):
        cam(Scaled().eval(), torch.randn(1, 3, 32, 32))


def test_recorder_inside_an_inference_forward_under_compile():
    """The hooks are traced by torch.compile (dynamo): the maps from a compiled model equal the
    eager ones. A tiny GAP + linear CNN and the eager backend keep the compile cheap."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 16, 3, stride=2),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x = torch.randn(2, 3, 16, 16)
    eager = cam(model, x)
    assert eager.layer == "3" and eager.maps.shape == (2, 7, 7)
    compiled = torch.compile(model, backend="eager")
    with CamRecorder(compiled) as rec, torch.inference_mode():
        logits = compiled(x)
        maps, _ = rec.maps(logits)
    torch.testing.assert_close(maps, eager.maps, rtol=1e-5, atol=1e-5)
