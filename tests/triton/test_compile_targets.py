"""Every Triton kernel compiles ahead of time for sm_80 (A100) and sm_90 (H100/H200) with no GPU
present, in every configuration its launcher can choose, within the architecture's shared
memory and without register spills (benchmarks/compile_targets.py does the work). Autotune
candidates are the exception: on a GPU the pruner compiles each one before it is timed and drops
it if it spills or exceeds the shared memory per block, so the check fails on a candidate only
for a compile error; the fixed config every tuned launch falls back to must fit.

The launches are captured from the public ops under the interpreter (kernels, argument dtypes,
constexprs, autotune configurations after pruning, fixed tiles), then compiled with ptxas in a
process without TRITON_INTERPRET. Compiling all of them takes most of an hour on two cores (the
records that must fit alone, about 20 minutes), so a run compiles one randomly chosen
configuration of every kernel for both targets (for a tuned kernel, one candidate and one
configuration that must fit); the seed is printed. Environment:

- ``ATTNKERN_COMPILE_CHECK=0``: skip the compile check (it runs by default, about 90 s on two
  cores);
- ``ATTNKERN_COMPILE_SEED=S``: that sample again;
- ``ATTNKERN_COMPILE_SAMPLE=N``: N records (at least one per kernel);
- ``ATTNKERN_COMPILE_FULL=1``: every record (the table of benchmarks/RESULTS.md);
- ``ATTNKERN_COMPILE_JOBS=J``: compile processes (default: the CPUs available, at most 4).
"""
import json
import os
import random
import subprocess
import sys
import time

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "benchmarks", "compile_targets.py")


def _tool():
    import importlib.util

    spec = importlib.util.spec_from_file_location("compile_targets", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_limits_of_each_architecture():
    ct = _tool()
    fits = {"shared": 163 * 1024, "regs": 255, "spill_stores": 0, "spill_loads": 0}
    assert ct.problems(fits, 80) == []
    assert ct.problems(dict(fits, shared=163 * 1024 + 1), 80)        # sm_80: 163 KiB a block
    assert ct.problems(dict(fits, shared=227 * 1024), 90) == []      # sm_90: 227 KiB
    assert ct.problems(dict(fits, shared=227 * 1024 + 1), 90)
    assert ct.problems(dict(fits, spill_loads=4), 90)
    assert ct.problems(dict(fits, regs=None), 90)                    # no ptxas figures: no pass


def test_only_autotune_candidates_may_not_fit():
    """A config that does not fit fails the check if anything launches it as it is (a launch, a
    tuned launch's fallback); as an autotune candidate only, it is reported as dropped."""
    ct = _tool()
    spills = {"shared": 1024, "regs": 255, "spill_stores": 8, "spill_loads": 8}
    spills["problems"] = ct.problems(spills, 90)
    too_big = dict(spills, shared=228 * 1024, spill_stores=0, spill_loads=0)
    too_big["problems"] = ct.problems(too_big, 90)
    no_log = dict(spills, regs=None, spill_stores=None, spill_loads=None)
    no_log["problems"] = ct.problems(no_log, 90)
    for r in (spills, too_big):
        assert ct.dropped_on_device(dict(r, roles=["candidate"])) and not ct.failed(dict(r, roles=["candidate"]))
        for roles in (["launch"], ["fallback"], ["candidate", "fallback"], ["candidate", "launch"], None):
            assert ct.failed(dict(r, roles=roles)) and not ct.dropped_on_device(dict(r, roles=roles))
    for roles in (["candidate"], ["launch"]):
        assert ct.failed(dict(no_log, roles=roles))
        assert ct.failed({"error": "CompilationError", "problems": [], "roles": roles})
        assert not ct.failed({"shared": 0, "problems": [], "roles": roles})


@pytest.mark.skipif(os.environ.get("ATTNKERN_COMPILE_CHECK", "") == "0",
                    reason="ATTNKERN_COMPILE_CHECK=0 skips the ahead-of-time sm_80/sm_90 compile check")
def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path):
    full = os.environ.get("ATTNKERN_COMPILE_FULL", "") not in ("", "0")
    seed = int(os.environ.get("ATTNKERN_COMPILE_SEED") or random.SystemRandom().randrange(2 ** 31))
    jobs = int(os.environ.get("ATTNKERN_COMPILE_JOBS") or min(4, len(os.sched_getaffinity(0))))
    report = tmp_path / "report.json"
    cmd = [sys.executable, TOOL, "run", "--jobs", str(jobs), "--report", str(report),
           "--markdown", str(tmp_path / "table.md")]
    cmd += ["--full"] if full else ["--seed", str(seed), "--sample", os.environ.get("ATTNKERN_COMPILE_SAMPLE", "0")]
    env = dict(os.environ)
    env.pop("ATTNKERN_BACKEND", None)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    print(r.stdout[-20000:], r.stderr[-5000:])
    print(f"compile targets: {'full sweep' if full else f'seed {seed}'}, {time.time() - t0:.0f} s")
    assert report.exists(), r.stderr[-5000:]
    data = json.loads(report.read_text())
    print(f"{len(data['dropped'])} autotune candidate compile(s) the pruner drops on the device")
    assert not data["uncovered"], f"kernels no public op launched in the capture: {data['uncovered']}"
    failed = [f"sm_{f['arch']} {f['kernel']} [{f['case']}] {f.get('constexprs')}: "
              f"{f.get('error') or '; '.join(f['problems'])}" for f in data["failed"]]
    assert not failed, f"seed {seed}:\n" + "\n".join(failed)
    kernels = {(x["module"], x["kernel"]) for x in data["results"]}
    assert len(kernels) >= 10
    for mod, kern in kernels:
        archs = {x["arch"] for x in data["results"] if (x["module"], x["kernel"]) == (mod, kern)}
        assert archs == {80, 90}, (kern, archs)
    for x in data["results"]:
        assert x["regs"] and x["regs"] <= 255 and x["shared"] >= 0
    ct = _tool()
    tuned = {x["kernel"] for x in data["results"] if not ct.must_fit(x)}
    assert tuned and all(any(x["kernel"] == k and ct.must_fit(x) for x in data["results"]) for k in tuned), \
        "a tuned kernel without a configuration that must fit in the sample"
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-5000:]
