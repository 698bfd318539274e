"""scripts/gpu_check.sh: its dry run (every stage on the CPU, tiny shapes, Triton under the
interpreter) so that the GPU check cannot rot while no GPU is at hand, and its FLOP count."""
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("ATTNKERN_BACKEND", None)
    return env


def _load():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("backward", [False, True])
def test_sdpa_flops_as_flash_attention_counts(causal, backward):
    # Two matmuls of 2*N*N*D FLOPs per head forward; the backward does 2.5x the forward's work.
    b, h, n, d = 3, 5, 96, 40
    fwd = 2 * (2 * n * n * d) * b * h
    expected = fwd * (1 + (2.5 if backward else 0)) / (2 if causal else 1)
    assert _load().sdpa_flops(b, h, n, d, causal, backward) == expected


def test_dry_run_never_writes_the_gpu_results():
    out = os.path.join(ROOT, "benchmarks", "RESULTS-gpu.md")
    before = open(out).read() if os.path.exists(out) else None
    r = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", out], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "never writes" in r.stderr
    assert (open(out).read() if os.path.exists(out) else None) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_without_a_gpu_it_says_so():
    r = subprocess.run([sys.executable, SCRIPT, "--stages", "sdpa"], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--dry-run" in r.stderr


def test_dry_run(tmp_path):
    out = tmp_path / "gpu.md"
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), "--dry-run", "--out", str(out)],
                       cwd=ROOT, env=dict(_env(), PYTHON=sys.executable), capture_output=True, text=True,
                       timeout=900)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    for stage in ("tests", "gating", "sdpa", "profile"):
        assert re.search(rf"gpu_check: stage {stage}: [0-9.]+ s wall, exit 0", log), (stage, log[-4000:])
    text = out.read_text()
    assert "CPU (dry run)" in text and "DRY RUN" in text
    assert "scripts/gpu_check.sh --dry-run" in text
    # tests: the chosen tests ran and passed
    m = re.search(r"\| \*\*all\*\* \| (\d+) \| (\d+) \|", text)
    assert m and int(m.group(1)) >= 1 and int(m.group(2)) == 0, text
    # gating: every block launched kernels, in both layouts, each timed with a finite bandwidth
    rows = [ln for ln in text.splitlines() if re.match(r"\| (cbam|se|bam) \| `", ln)]
    assert {ln.split("|")[1].strip() for ln in rows} == {"cbam", "se", "bam"}
    assert {ln.split("|")[4].strip() for ln in rows} == {"NCHW", "channels_last"}
    for ln in rows:
        gbs = float(ln.split("|")[8])
        assert gbs >= 0 and gbs == gbs
    # sdpa: attnkern against torch, forward and forward+backward, full and causal, all measured
    sd = [ln for ln in text.splitlines() if re.match(r"\| (full|causal) \|", ln)]
    assert len(sd) == 4, text
    assert all("error" not in ln and all(c.strip() not in ("", "-") for c in ln.split("|")[6:8]) for ln in sd), sd
    # the profile job ran both variants and its table is in the report
    assert re.search(r"\| naive \|", text) and re.search(r"\| fused \|", text), text


def test_tile_sweep_dry_run(tmp_path):
    # benchmarks/gpu_tile_sweep.py on the CPU: every launch of both blocks timed under each
    # setting, and the module constants it overrides restored afterwards.
    out = tmp_path / "sweep.jsonl"
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import gpu_tile_sweep as s; "
            "from attnkern.triton import _gating_common as c; before = c._MIN_BLOCK_HW; "
            f"s.main(['--dry-run', '--out', {str(out)!r}]); assert c._MIN_BLOCK_HW == before")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    settings = {r["setting"] for r in rows}
    assert settings == {"default", "min_block_hw_128"}
    for setting in settings:
        kernels = {(r["block"], r["kernel"]) for r in rows if r["setting"] == setting}
        assert ("cbam", "_spatial_stats_kernel") in kernels and ("se", "_gate_apply_kernel") in kernels
    assert all(r["us"] > 0 for r in rows)
    assert "| cbam | 2x16x6x5 | NCHW | float32 |" in r.stdout
