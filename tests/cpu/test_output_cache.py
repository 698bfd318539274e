"""The C++ kernels' cache of big output blocks (csrc/output_cache.cpp): outputs of 1 MiB and more
come from blocks freed earlier, never from one a live tensor holds, with x's strides, and equal
to the reference; the limit, its environment variable and emptying the cache."""
import os
import subprocess
import sys

import pytest
import torch

import attnkern
from attnkern import _cpu
from attnkern.reference import gating as ref
from attnkern.ops.gating import acc_dtype

# fp32 2x64x48x48: 1.2 MB, above the cache's 1 MiB threshold
BIG = (2, 64, 48, 48)


@pytest.fixture
def ext():
    ext = _cpu.require()
    before = _cpu.set_output_cache_limit(64)
    _cpu.empty_output_cache()
    yield ext
    _cpu.set_output_cache_limit(before)
    _cpu.empty_output_cache()


def _inputs(layout, dtype=torch.float32, shape=BIG):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    B, C, H, W = shape
    gc, gs = torch.rand(B, C, generator=g), torch.rand(B, H * W, generator=g)
    return x, gc, gs


def _big_outputs(ext, x, gc, gs):
    """The four ops whose output is x-sized, each with its reference."""
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
    grad = grad.contiguous(memory_format=attnkern.ops.gating.memory_format_of(x))
    mc, ms = gc - 0.5, gs - 0.5
    return {
        "gate_apply": (lambda: ext.gate_apply(x, gc, gs), lambda: ref.gate_apply(x, gc, gs)),
        "gating_input_grad": (
            lambda: ext.gating_input_grad(x, grad, gc, gs, *([None] * 8)),
            lambda: ref.gating_input_grad(x, grad, gc, gs, *([None] * 8))),
        "bam_combine": (lambda: ext.bam_combine(x, mc, ms, False), lambda: ref.bam_combine(x, mc, ms, False)),
        "bam_input_grad": (lambda: ext.bam_input_grad(x, grad, mc, ms, False, None),
                           lambda: ref.bam_input_grad(x, grad, mc, ms, False, None)),
    }


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_reused_blocks_give_the_reference_and_x_strides(ext, layout):
    x, gc, gs = _inputs(layout)
    for name, (op, reference) in _big_outputs(ext, x, gc, gs).items():
        first = op()
        ptr = first.data_ptr()
        expected = reference()
        del first  # its block goes back to the cache
        hits = _cpu.output_cache_info()["hits"]
        again = op()
        assert again.data_ptr() == ptr, name  # the freed block, still mapped
        assert _cpu.output_cache_info()["hits"] == hits + 1, name
        assert again.stride() == x.stride() and again.dtype == x.dtype, name
        torch.testing.assert_close(again, expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_a_cached_block_gives_the_same_bits_as_a_fresh_one(ext, layout, dtype):
    # every dtype the kernels take: the outputs written into a reused block equal, bit for bit,
    # those written into fresh memory with the cache off (2x64x64x64: 1 MiB in 16-bit types)
    x, gc, gs = _inputs(layout, dtype, shape=(2, 64, 64, 64))
    gc, gs = gc.to(acc_dtype(dtype)), gs.to(acc_dtype(dtype))
    calls = _big_outputs(ext, x, gc, gs)
    limit = _cpu.set_output_cache_limit(0)
    fresh = {name: op() for name, (op, _) in calls.items()}
    _cpu.set_output_cache_limit(limit)
    for name, (op, _) in calls.items():
        op()  # its block goes back to the cache
        hits = _cpu.output_cache_info()["hits"]
        again = op()
        assert _cpu.output_cache_info()["hits"] == hits + 1, name
        assert again.stride() == x.stride() and torch.equal(again, fresh[name]), name


def test_a_live_output_block_is_never_handed_out(ext):
    x, gc, gs = _inputs("contiguous")
    outs = [ext.gate_apply(x, gc, gs) for _ in range(4)]
    assert len({o.data_ptr() for o in outs}) == 4
    for o in outs:
        torch.testing.assert_close(o, ref.gate_apply(x, gc, gs))


def test_small_outputs_bypass_the_cache(ext):
    x, gc, gs = _inputs("contiguous", shape=(2, 8, 9, 7))
    before = _cpu.output_cache_info()
    out = ext.gate_apply(x, gc, gs)
    del out
    after = _cpu.output_cache_info()
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
    assert after["cached_bytes"] == 0


def test_limit_evicts_the_oldest_and_zero_turns_the_cache_off(ext):
    x, gc, gs = _inputs("contiguous")
    block = _cpu.output_cache_info
    a, b = ext.gate_apply(x, gc, gs), ext.gate_apply(x, gc, gs)
    ptr_b = b.data_ptr()
    _cpu.set_output_cache_limit(2)  # room for one 1.2 MB block
    del a, b  # a, then b: a is evicted when b comes back
    assert block()["cached_blocks"] == 1
    assert ext.gate_apply(x, gc, gs).data_ptr() == ptr_b  # (freed again at once)
    _cpu.set_output_cache_limit(0)
    assert block()["cached_bytes"] == 0 and block()["limit_bytes"] == 0
    out = ext.gate_apply(x, gc, gs)
    del out
    assert block()["cached_bytes"] == 0
    assert _cpu.set_output_cache_limit(64) == 0


def test_empty_returns_the_idle_blocks(ext):
    x, gc, gs = _inputs("contiguous")
    out = ext.gate_apply(x, gc, gs)
    nbytes = out.numel() * out.element_size()
    del out
    assert _cpu.output_cache_info()["cached_bytes"] >= nbytes
    assert attnkern.empty_cpu_output_cache() >= nbytes
    assert _cpu.output_cache_info()["cached_bytes"] == 0


def test_cached_outputs_are_ordinary_tensors(ext):
    x, gc, gs = _inputs("contiguous")
    out = ext.gate_apply(x, gc, gs)
    expected = out.clone()
    out.resize_(3 * out.numel())  # resizable storage: the cache allocates the larger block
    torch.testing.assert_close(out[: expected.numel()], expected.flatten())
    out.resize_(0)
    shared = ext.gate_apply(x, gc, gs).share_memory_()
    torch.testing.assert_close(shared, expected)
    torch.testing.assert_close(torch.from_numpy(ext.gate_apply(x, gc, gs).numpy()), expected)


def test_blocks_freed_on_another_thread_return_to_the_cache(ext):
    import threading

    x, gc, gs = _inputs("contiguous")
    outs = [ext.gate_apply(x, gc, gs) for _ in range(8)]
    ptrs = {o.data_ptr() for o in outs}
    threading.Thread(target=outs.clear).start()
    for _ in range(100):
        if _cpu.output_cache_info()["cached_blocks"] == 8:
            break
        threading.Event().wait(0.01)
    assert _cpu.output_cache_info()["cached_blocks"] == 8
    assert ext.gate_apply(x, gc, gs).data_ptr() in ptrs


@pytest.mark.parametrize("value", ["lots", "-3", "1.5"])
def test_a_bad_limit_variable_is_a_clear_error(value):
    code = ("import torch, attnkern.ops.gating\n"
            "x = torch.randn(2, 64, 48, 48)\n"
            "try:\n"
            "    torch.ops.attnkern.gate_apply(x, None, None)\n"
            "except RuntimeError as e:\n"
            "    print(e)\n")
    env = dict(os.environ, ATTNKERN_CPU_OUTPUT_CACHE_MB=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ATTNKERN_CPU_OUTPUT_CACHE_MB must be a whole number of MB" in out.stdout and repr(value) in out.stdout, \
        out.stdout


def test_the_limit_variable_is_read():
    code = ("import torch, attnkern\n"
            "from attnkern import _cpu\n"
            "x = torch.randn(2, 64, 48, 48)\n"
            "out = torch.ops.attnkern.gate_apply(x, None, None)\n"
            "del out\n"
            "info = _cpu.output_cache_info()\n"
            "print(info['limit_bytes'], info['cached_bytes'])\n")
    for mb, kept in (("0", False), ("7", True)):
        env = dict(os.environ, ATTNKERN_CPU_OUTPUT_CACHE_MB=mb)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        limit, cached = map(int, out.stdout.split())
        assert limit == int(mb) << 20 and (cached > 0) == kept


def test_threads_allocating_and_freeing_at_once_never_share_a_block(ext):
    """Four threads take outputs and free them in turn, the ops overlapping: every output must
    equal the reference, which a block handed out twice would break, since two ops would write
    it at once with gates 1/4 apart."""
    import threading

    x, gc, _ = _inputs("contiguous")
    gates = [gc * (k + 1) / 4 for k in range(4)]
    expected = [ref.gate_apply(x, g, None) for g in gates]
    errors = []

    def worker(k):
        try:
            for _ in range(25):
                out = ext.gate_apply(x, gates[k], None)
                if not torch.allclose(out, expected[k], rtol=1e-5, atol=1e-6):
                    errors.append(f"thread {k}: output differs from the reference")
                del out
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(f"thread {k}: {e!r}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert _cpu.output_cache_info()["hits"] > 0
