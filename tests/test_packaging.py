"""Packaging: attnkern needs torch and numpy only (everything else is an extra, imported when
used), its declared torch range admits the torch it is tested with, and pip is never asked to
replace an installed torch."""
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTED_TORCH = "2.14.1"


def _pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def _closure(dists):
    """The distributions ``dists`` need, transitively (extras' requirements left out)."""
    seen, todo = set(), list(dists)
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for r in reqs:
            req = Requirement(r)
            if req.marker is not None and "extra" in str(req.marker):
                continue
            todo.append(req.name)
    return seen


def _allowed_modules():
    """Top-level modules of torch, numpy and what they depend on, plus attnkern."""
    dists = _closure(["torch", "numpy"])
    allowed = {"attnkern", "torch", "numpy", "torchgen", "functorch"}
    for mod, owners in md.packages_distributions().items():
        if any(re.sub(r"[-_.]+", "-", o).lower() in dists for o in owners):
            allowed.add(mod)
    return sorted(allowed)


# Installed first thing in the child: every import of a top-level module that is not the
# standard library's and not in ATTNKERN_ALLOWED fails as if the package were not installed.
BLOCKER = r'''
import importlib.abc, json, os, sys
ALLOWED = set(json.loads(os.environ["ATTNKERN_ALLOWED"])) | set(sys.stdlib_module_names) | set(sys.builtin_module_names)
BLOCKED = []
class OnlyTorchAndNumpy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in ALLOWED or top.startswith("_"):
            return None
        BLOCKED.append(top)
        raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)
sys.meta_path.insert(0, OnlyTorchAndNumpy())
'''


def _run_blocked(code, tmp_path):
    env = dict(os.environ, ATTNKERN_ALLOWED=json.dumps(_allowed_modules()), PYTHONPATH=ROOT,
               ATTNKERN_CACHE=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-c", BLOCKER + code], env=env, capture_output=True, text=True,
                          timeout=300, cwd=str(tmp_path))


def test_import_and_cbam_forward_with_torch_and_numpy_only(tmp_path):
    """As in an environment with nothing but torch (and numpy): import attnkern and its
    modules, and run a CBAM forward on the CPU."""
    code = r'''
import torch
import attnkern, attnkern.nn, attnkern.functional, attnkern.explain, attnkern.slides, attnkern.cli
import attnkern.slides.profile
from attnkern.reference.cbam import cbam as reference_cbam
torch.manual_seed(0)
m = attnkern.CBAM(16).eval()
x = torch.randn(2, 16, 9, 7)
with torch.no_grad():
    y = m(x)
assert y.shape == x.shape and torch.isfinite(y).all()
heavy = sorted(n for n in ("timm", "openslide", "skimage", "matplotlib", "PIL", "tifffile", "tqdm", "psutil",
                           "pytorch_grad_cam", "torchvision", "scipy") if n in sys.modules)
assert not heavy, heavy
print("OK", sorted(set(BLOCKED)))
'''
    proc = _run_blocked(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("OK")


def test_the_blocker_blocks(tmp_path):
    """The check above can fail: a package outside torch's and numpy's world is refused."""
    proc = _run_blocked("import matplotlib\n", tmp_path)
    assert proc.returncode != 0 and "blocked" in proc.stderr


def test_cli_names_the_extra_to_install(tmp_path):
    """Without the slides extra, `attnkern profile` says which extra to install, in one line."""
    code = r'''
from attnkern.cli import main
sys.exit(main(["profile", "--out", "o", "--no-progress", "--workers", "0"]))
'''
    proc = _run_blocked(code, tmp_path)
    err = proc.stderr.strip()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "pip install 'attnkern[slides]'" in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_core_dependencies_are_torch_and_numpy_ranges():
    project = _pyproject()["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    assert sorted(r.name for r in reqs) == ["numpy", "torch"]
    torch_req = next(r for r in reqs if r.name == "torch")
    assert torch_req.specifier.contains(TESTED_TORCH)
    assert not any(s.operator in ("==", "===") for r in reqs for s in r.specifier), "a pin would replace torch"
    assert torch_req.specifier.contains("2.15.0")  # a newer torch stays
    import torch
    assert torch_req.specifier.contains(torch.__version__.split("+")[0])
    build = [Requirement(r) for r in _pyproject()["build-system"]["requires"]]
    assert all(s.operator != "==" for r in build if r.name == "torch" for s in r.specifier)


def test_extras_and_requirements_pins():
    """The slide stack and grad-cam are extras, dev holds the test tools; requirements.txt pins
    exactly what the two README commands install, torch at the tested version."""
    extras = _pyproject()["project"]["optional-dependencies"]
    names = {k: {Requirement(r).name for r in v} for k, v in extras.items()}
    assert {"timm", "openslide-python", "openslide-bin", "scikit-image", "tifffile", "matplotlib"} <= names["slides"]
    assert "grad-cam" in names["explain"]
    assert {"pytest", "pytest-benchmark", "hypothesis"} <= names["dev"]
    assert any(Requirement(r).name == "attnkern" and {"slides", "explain"} <= Requirement(r).extras for r in extras["dev"])
    pins = []
    for line in open(os.path.join(ROOT, "requirements.txt")):
        line = line.split("#")[0].strip()
        if line:
            pins.append(Requirement(line))
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in pins), \
        [str(r) for r in pins if not str(r.specifier).startswith("==")]
    pinned = {r.name: str(next(iter(r.specifier)).version) for r in pins}
    assert pinned["torch"] == TESTED_TORCH
    every_extra = set().union(*names.values()) - {"attnkern"}
    assert every_extra <= set(pinned), every_extra - set(pinned)


def test_python_m_attnkern_is_the_cli(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    a = subprocess.run([sys.executable, "-m", "attnkern", "--help"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert a.returncode == 0 and "profile" in a.stdout and "compare" in a.stdout
    c = subprocess.run([sys.executable, "-m", "attnkern", "profile", "--help"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert c.returncode == 0 and "--mpp" in c.stdout
    scripts = _pyproject()["project"]["scripts"]
    assert scripts == {"attnkern": "attnkern.cli:main"}
