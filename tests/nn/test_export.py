"""Export: torch.export and ONNX (the dynamo exporter, run with onnxruntime) of converted models
and of the blocks. While exporting, the blocks run their pure-PyTorch reference
(attnkern._backend.pick), so the exported graph holds only ATen ops: it runs without attnkern,
on any device, and every ONNX runtime can execute it."""
import copy
import os
import subprocess
import sys

import pytest
import timm
import torch

import attnkern
from attnkern import _backend
from attnkern.nn import BAM, CBAM, SqueezeExcite
from tests.tolerance import assert_close

ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in requirements.txt")
pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript")


def _cbam_resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=10, zero_init_last=False,
                             block_args=dict(attn_layer="cbam"))


def _blocks():
    torch.manual_seed(0)
    return torch.nn.Sequential(CBAM(16), SqueezeExcite(16), BAM(16), BAM(16, combine="product"))


def _trained_bn(model):
    """Non-trivial BatchNorm statistics (a few training-mode forwards), then eval mode."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, *IN[model]))
    return model.eval()


IN = {}


def _make(name):
    if name == "cbam-resnet18":
        m = attnkern.convert(_cbam_resnet())
        IN[m] = (3, 32, 32)
    else:
        m = _blocks()
        IN[m] = (16, 9, 13)
    return _trained_bn(m)


def _ref64(model, x):
    """The model in float64 (the blocks' reference numbers up to rounding)."""
    with torch.no_grad():
        return copy.deepcopy(model).double()(x.double())


def _has_attnkern_ops(graph_module):
    return any("attnkern" in str(n.target) for n in graph_module.graph.nodes if n.op == "call_function")


def test_exporting_picks_the_reference(monkeypatch):
    picked = []
    orig = _backend.pick

    def spy(*a, **k):
        picked.append((_backend.exporting(), orig(*a, **k)))
        return picked[-1][1]

    monkeypatch.setattr(_backend, "pick", spy)
    m = CBAM(8).eval()
    x = torch.randn(1, 8, 5, 5)
    m(x)
    torch.export.export(m, (x,))
    assert picked[0] == (False, "cpu") and picked[-1] == (True, "reference")


_EXPORTED = {}


def _export(name):
    """(model, exported program) for ``name``; the blocks with a dynamic batch dimension (the
    models static: symbolic shapes through a whole network cost much export time here)."""
    if name not in _EXPORTED:
        model = _make(name)
        x = torch.randn(2, *IN[model])
        dyn = {"input": {0: torch.export.Dim("batch", min=1, max=64)}} if name == "blocks" else None
        _EXPORTED[name] = model, torch.export.export(model, (x,), dynamic_shapes=dyn)
    return _EXPORTED[name]


@pytest.mark.parametrize("name", ["cbam-resnet18", "blocks"])
def test_torch_export(name):
    model, ep = _export(name)
    assert not _has_attnkern_ops(ep.graph_module), "the exported graph should hold ATen ops only"
    for n in ((2, 3) if name == "blocks" else (2,)):  # the traced batch size and another one
        xi = torch.randn(n, *IN[model])
        with torch.no_grad():
            y, y_ep = model(xi), ep.module()(xi)
        assert_close(y_ep, _ref64(model, xi), y, dtype=torch.float32, name=f"{name} exported, batch {n}")


def test_exported_program_runs_without_attnkern(tmp_path):
    """Saved with torch.export.save, loaded and run by a process that never imports attnkern."""
    model, ep = _export("blocks")
    x = torch.randn(3, *IN[model])
    path = str(tmp_path / "model.pt2")
    torch.export.save(ep, path)
    torch.save(x, str(tmp_path / "x.pt"))
    code = (
        "import sys, torch\n"
        f"ep = torch.export.load({path!r})\n"
        f"y = ep.module()(torch.load({str(tmp_path / 'x.pt')!r}))\n"
        f"torch.save(y, {str(tmp_path / 'y.pt')!r})\n"
        "assert not any(m.startswith('attnkern') for m in sys.modules), 'attnkern was imported'\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    y = torch.load(str(tmp_path / "y.pt"))
    with torch.no_grad():
        assert_close(y, _ref64(model, x), model(x), dtype=torch.float32, name="loaded program")


def test_forced_backend_is_exported_as_custom_ops(monkeypatch):
    """ATTNKERN_BACKEND=cpu is honoured while exporting: the graph calls attnkern's custom ops
    (torch.export runs them with attnkern imported; ONNX cannot translate them)."""
    monkeypatch.setenv("ATTNKERN_BACKEND", "cpu")
    model = _make("blocks")
    x = torch.randn(2, *IN[model])
    ep = torch.export.export(model, (x,))
    assert _has_attnkern_ops(ep.graph_module)
    with torch.no_grad():
        assert_close(ep.module()(x), _ref64(model, x), model(x), dtype=torch.float32, name="forced cpu")


def _ort_run(path, x):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    return torch.from_numpy(sess.run(None, {inp.name: x.numpy()})[0])


@pytest.mark.parametrize("name", ["cbam-resnet18", "blocks"])
def test_onnx_dynamo_export_runs_in_onnxruntime(name, tmp_path):
    """The blocks exported from the module; the model from its ExportedProgram (the dynamo
    exporter's first step is the same torch.export.export(strict=False) call, done once here)."""
    if name == "blocks":
        model = _make(name)
        src = model
    else:
        model, src = _export(name)
    x = torch.randn(2, *IN[model])
    prog = torch.onnx.export(src, (x,), dynamo=True, verbose=False)
    path = str(tmp_path / "model.onnx")
    prog.save(path)
    y_ort = _ort_run(path, x)
    with torch.no_grad():
        y = model(x)
    assert y_ort.shape == y.shape
    assert_close(y_ort, _ref64(model, x), y, dtype=torch.float32, name=f"{name} in onnxruntime")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_onnx_torchscript_export_runs_in_onnxruntime(tmp_path):
    """The older exporter (torch.jit.trace underneath) also gets the reference."""
    model = _make("blocks")
    x = torch.randn(2, *IN[model])
    path = str(tmp_path / "model.onnx")
    torch.onnx.export(model, (x,), path, dynamo=False)
    with torch.no_grad():
        assert_close(_ort_run(path, x), _ref64(model, x), model(x), dtype=torch.float32, name="torchscript onnx")
