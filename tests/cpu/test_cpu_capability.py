"""One build of the C++ kernels for any x86-64 CPU: a copy per vector ISA, chosen at run time
from the CPU and the environment (ATTNKERN_CPU_CAPABILITY, ATEN_CPU_CAPABILITY), and no
instruction wider than its ISA in any copy or in the code every CPU runs."""
import os
import platform
import re
import shutil
import subprocess
import sys
from collections import defaultdict

import pytest

from attnkern import _cpu

ORDER = ["DEFAULT", "AVX2", "AVX512", "AVX512_BF16"]
X86_64 = platform.machine().lower() in ("x86_64", "amd64")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return set()


def _expected_capabilities():
    """What /proc/cpuinfo says this CPU runs (the library reads CPUID itself)."""
    flags = _cpu_flags()
    caps = ["DEFAULT"]
    if X86_64 and {"avx2", "fma", "f16c", "avx"} <= flags:
        caps.append("AVX2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
            caps.append("AVX512")
            if "avx512_bf16" in flags:
                caps.append("AVX512_BF16")
    return caps


@pytest.fixture(scope="module")
def ext():
    return _cpu.require()


def test_every_capability_this_cpu_runs_is_built_and_usable(ext):
    assert _cpu.cpu_capabilities() == _expected_capabilities()


def _active_in_fresh_process(**env):
    """The capability a new process picks with these variables (and no others of ours)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("ATTNKERN_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")}
    clean.update(env)
    code = "from attnkern import _cpu; print(_cpu.cpu_capability())"
    r = subprocess.run([sys.executable, "-W", "always", "-c", code], env=clean, capture_output=True,
                       text=True, timeout=300)
    return r


def _chosen(**env):
    r = _active_in_fresh_process(**env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1], r.stderr


def test_widest_by_default(ext):
    assert _chosen()[0] == _expected_capabilities()[-1]


@pytest.mark.parametrize("value", ["default", "DEFAULT", "avx2", "Avx512", "avx512_bf16"])
def test_attnkern_variable_lowers_the_choice(ext, value):
    wanted = value.upper()
    chosen, stderr = _chosen(ATTNKERN_CPU_CAPABILITY=value)
    if wanted in _expected_capabilities():
        assert chosen == wanted
    else:  # more than this CPU runs: the widest it does, with a warning naming the variable
        assert chosen == _expected_capabilities()[-1]
        assert "ATTNKERN_CPU_CAPABILITY" in stderr


def test_aten_variable_is_honoured_and_ours_wins(ext):
    assert _chosen(ATEN_CPU_CAPABILITY="default")[0] == "DEFAULT"
    if "AVX2" in _expected_capabilities():
        assert _chosen(ATEN_CPU_CAPABILITY="default", ATTNKERN_CPU_CAPABILITY="avx2")[0] == "AVX2"
    # ATen's values for other architectures mean nothing here, as in ATen
    assert _chosen(ATEN_CPU_CAPABILITY="zvector")[0] == _expected_capabilities()[-1]
    # ATen's widest value, avx512, names no narrower copy than AVX512_BF16 (ATen has no name
    # for it), and warns only where the CPU has no AVX-512
    if "AVX512" in _expected_capabilities():
        chosen, stderr = _chosen(ATEN_CPU_CAPABILITY="avx512")
        assert chosen == _expected_capabilities()[-1]
        assert "ATEN_CPU_CAPABILITY" not in stderr


def test_bad_value_is_a_clear_error(ext):
    r = _active_in_fresh_process(ATTNKERN_CPU_CAPABILITY="sse9")
    assert r.returncode != 0
    assert "ATTNKERN_CPU_CAPABILITY must be one of default, avx2, avx512, avx512_bf16" in r.stderr
    assert "sse9" in r.stderr


def test_set_at_run_time(ext):
    before = _cpu.cpu_capability()
    try:
        for name in _cpu.cpu_capabilities():
            _cpu.set_cpu_capability(name.lower())
            assert _cpu.cpu_capability() == name
    finally:
        _cpu.set_cpu_capability(before)
    with pytest.raises(RuntimeError, match="must be one of default, avx2, avx512, avx512_bf16"):
        _cpu.set_cpu_capability("neon")
    missing = [c for c in ORDER if c not in _cpu.cpu_capabilities()]
    for name in missing:
        with pytest.raises(RuntimeError, match="does not run on this CPU"):
            _cpu.set_cpu_capability(name)
    assert _cpu.cpu_capability() == before


# ---------------------------------------------------------------------------------------------
# The instructions in the library: every function outside a vector copy must run on the
# x86-64 baseline (no VEX or EVEX instruction: it may run on any CPU, e.g. the static
# initialisers when the library loads, and the copies of shared inline functions the linker
# kept), the AVX2 copy must not use AVX-512, and only the AVX512_BF16 copy may use the BF16
# instructions.
# ---------------------------------------------------------------------------------------------

_FUNCTION = re.compile(r"^[0-9a-f]+ <(.+)>:$")
_INSN = re.compile(r"^\s+[0-9a-f]+:\s+(\S+)\s*(.*)$")
_BF16 = ("vcvtne2ps2bf16", "vcvtneps2bf16", "vdpbf16ps")
# the widest instructions each copy may hold
_ALLOWED = {None: None, "AVX2": "AVX", "AVX512": "AVX512", "AVX512_BF16": "AVX512_BF16"}
_RANK = {None: 0, "AVX": 1, "AVX512": 2, "AVX512_BF16": 3}


def _needs(mnemonic, operands):
    """The widest ISA an instruction needs: 'AVX512_BF16', 'AVX512', 'AVX' (any VEX instruction)
    or None."""
    operands = re.sub(r"<.*>", "", operands)  # a symbol named in a call or jump
    if mnemonic.startswith(_BF16):
        return "AVX512_BF16"
    if "%zmm" in operands or re.search(r"%k[0-7]\b", operands) or "{" in operands or \
            re.search(r"%[xy]mm(1[6-9]|2[0-9]|3[01])\b", operands) or mnemonic.startswith("k"):
        return "AVX512"
    if mnemonic.startswith("v") or "%ymm" in operands:
        return "AVX"
    return None


def _copy_of(name):
    """The vector copy a function belongs to (its name or a type in it is in an AVX2, AVX512 or
    AVX512_BF16 namespace: ours or at::vec's), or None."""
    return next((cap for cap in ("AVX512_BF16", "AVX512", "AVX2")
                 if f"{cap}::" in name or f"{len(cap)}{cap}" in name), None)  # demangled or not


@pytest.mark.skipif(not X86_64, reason="vector copies are built on x86-64 only")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump (binutils)")
def test_no_instruction_wider_than_its_copy(ext):
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", _cpu.library_path()],
                         capture_output=True, text=True, check=True).stdout
    function, found, wrong = None, defaultdict(int), defaultdict(set)
    for line in out.splitlines():
        m = _FUNCTION.match(line)
        if m:
            function = m.group(1)
            continue
        m = _INSN.match(line)
        if not m or function is None:
            continue
        need = _needs(m.group(1), m.group(2))
        if need is None:
            continue
        copy = _copy_of(function)
        found[copy] += 1
        found["BF16 instructions"] += need == "AVX512_BF16"
        if _RANK[need] > _RANK[_ALLOWED[copy]]:
            wrong[function].add(m.group(1))
    assert not wrong, "functions that use instructions wider than their copy's ISA:\n" + \
        "\n".join(f"{f}: {sorted(i)[:8]}" for f, i in sorted(wrong.items())[:20])
    # the copies are there and vectorised, and the BF16 copy rounds with the BF16 instructions
    assert found["AVX2"] > 0 and found["AVX512"] > 0 and found["AVX512_BF16"] > 0, dict(found)
    assert found["BF16 instructions"] > 0, dict(found)
