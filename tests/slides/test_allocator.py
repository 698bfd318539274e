"""The allocator policy of ``attnkern profile`` (attnkern/slides/allocator.py): what ``auto``
does on this machine, in a process of its own (mallopt changes the whole process), the rerun
with a caching allocator preloaded, and that the report names the policy."""
import json
import os
import subprocess
import sys

import pytest

from attnkern.slides import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _in_fresh_process(code: str, **env) -> str:
    e = dict(os.environ, PYTHONPATH=ROOT, **env)
    e.pop("ATTNKERN_ALLOCATOR", None)
    return subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True).stdout


def test_auto_tunes_glibc_or_keeps_a_preloaded_caching_allocator():
    said = _in_fresh_process("from attnkern.slides.allocator import apply; print(apply('auto'))").strip()
    if allocator.loaded_caching_allocator():
        assert said.endswith("(preloaded)")
    elif os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
        assert said.startswith("glibc malloc tuned"), said


def test_tuned_glibc_reuses_freed_large_blocks_without_page_faults():
    """The point of the policy: in a loop that makes and frees a 64 MB tensor, as every batch
    does, the last of eight costs (almost) no minor page faults under ``auto``, and one per 4 KiB
    page under ``off``."""
    code = """
import resource, torch, sys
from attnkern.slides.allocator import apply
apply(sys.argv[1])
n = 16 * 2 ** 20
for i in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(n)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""
    if allocator.loaded_caching_allocator() or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
        pytest.skip("glibc's malloc is not the allocator here")

    def faults(policy):
        e = dict(os.environ, PYTHONPATH=ROOT)
        r = subprocess.run([sys.executable, "-c", code, policy], env=e, capture_output=True, text=True, check=True)
        return int(r.stdout.split()[-1])

    pages = 64 * 2 ** 20 // 4096
    assert faults("off") > pages // 2
    assert faults("auto") < pages // 10


def test_rerun_preloads_a_caching_allocator_where_one_is_installed(monkeypatch):
    monkeypatch.delenv("ATTNKERN_ALLOCATOR_PRELOADED", raising=False)
    monkeypatch.setattr(allocator, "loaded_caching_allocator", lambda: None)
    monkeypatch.setattr(allocator.ctypes.util, "find_library",
                        lambda name: "libjemalloc.so.2" if name == "jemalloc" else None)
    cmd, env = allocator.preload_rerun("auto", ["profile", "--max-tiles", "4"])
    assert cmd == [sys.executable, "-m", "attnkern", "profile", "--max-tiles", "4"]
    assert env["LD_PRELOAD"].split(":")[0] == "libjemalloc.so.2"
    assert env["ATTNKERN_ALLOCATOR_PRELOADED"] == "1"
    assert allocator.preload_rerun("off", ["profile"]) is None
    monkeypatch.setenv("ATTNKERN_ALLOCATOR_PRELOADED", "1")  # the rerun does not rerun again
    assert allocator.preload_rerun("auto", ["profile"]) is None


def test_no_rerun_without_a_caching_allocator(monkeypatch):
    monkeypatch.delenv("ATTNKERN_ALLOCATOR_PRELOADED", raising=False)
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    assert allocator.preload_rerun("auto", ["profile"]) is None


def test_unknown_policy_is_named():
    with pytest.raises(ValueError, match=r"allocator policy must be one of \('auto', 'off'\), got 'fast'"):
        allocator.apply("fast")


def test_the_report_names_the_allocator(small_slide, tmp_path):
    from attnkern.cli import main

    out = str(tmp_path / "out")
    assert main(["profile", small_slide, "--model", "cbam_resnet18", "--tile", "64", "--batch", "4",
                 "--max-tiles", "4", "--workers", "0", "--compare", "fused", "--out", out, "--no-progress",
                 "--allocator", "off"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["machine"]["allocator"] == "the C library's malloc, untuned (--allocator off)"
    assert "Memory allocator (every variant): the C library's malloc, untuned" in open(os.path.join(out, "report.md")).read()
