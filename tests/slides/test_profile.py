"""The profile job end to end on a small generated slide, and its errors through the CLI."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from attnkern.cli import main


def test_profile_writes_every_output(small_slide, tmp_path, capsys):
    out = str(tmp_path / "out")
    rc = main(["profile", small_slide, "--model", "cbam_resnet18", "--tile", "128", "--batch", "4",
               "--max-tiles", "8", "--workers", "0", "--compare", "naive,fused", "--out", out, "--no-progress"])
    assert rc == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["partial"] is False
    assert set(report["variants"]) == {"naive", "fused"}
    for v in report["variants"].values():
        for key in ("tiles", "seconds", "read_seconds", "compute_seconds", "tiles_per_s",
                    "megapixels_per_s", "peak_rss_mb", "bound"):
            assert key in v
        assert v["tiles"] == 8 and v["tiles_per_s"] > 0
        assert v["channels_last"] is True  # the default layout, on CPU too
    # the fused model makes the same predictions as timm's on the same tiles
    assert report["variants"]["fused"]["same_predictions_as_naive"] == 1.0
    assert report["heatmap"]["kind"] == "cbam_spatial_gate"
    mask = np.asarray(Image.open(os.path.join(out, "mask.png"))) > 0
    heat = np.load(os.path.join(out, "heatmap.npy"))
    assert heat.shape == mask.shape and max(mask.shape) == 1024 and heat.dtype == np.float32
    assert (~np.isnan(heat) & mask).any()
    # the figure: the thumbnail-sized overlay plus a title and a colour bar
    png = Image.open(os.path.join(out, "heatmap.png"))
    assert png.size[0] > mask.shape[1] and png.size[1] > mask.shape[0]
    lo, hi = report["heatmap"]["range"]
    assert lo <= hi
    md = open(os.path.join(out, "report.md")).read()
    assert "| fused |" in md
    written = [f["file"] for f in report["files"]]
    assert set(written) == {"mask.png", "heatmap.png", "heatmap.npy", "tiles.csv", "tiles.geojson",
                            "report.json", "report.md"}
    for name in written:  # every file the report lists exists, and is listed in report.md too
        assert os.path.getsize(os.path.join(out, name)) > 0, name
        assert f"`{name}`" in md
    assert set(os.listdir(out)) == set(written)
    stdout = capsys.readouterr().out
    assert "tiles/s" in stdout and "tiles.geojson" in stdout


def test_vit_heatmap_is_the_cls_attention(small_slide, tmp_path):
    """A ViT profiles like a CNN, and its heatmap is the CLS token's attention over the patches
    of the last block (attnkern.explain.attention_rows), normalised per tile, inside the tissue."""
    out = str(tmp_path / "out")
    rc = main(["profile", small_slide, "--model", "vit_tiny", "--tile", "64", "--batch", "4",
               "--max-tiles", "4", "--workers", "0", "--compare", "naive,fused", "--out", out, "--no-progress"])
    assert rc == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["variants"]["fused"]["same_predictions_as_naive"] == 1.0
    assert report["heatmap"]["kind"] == "vit_cls_attention"
    heat = np.load(os.path.join(out, "heatmap.npy"))
    mask = np.asarray(Image.open(os.path.join(out, "mask.png"))) > 0
    assert heat.shape == mask.shape
    assert np.nanmax(heat) == pytest.approx(1.0, abs=0.05)  # per tile normalised to a maximum of 1
    rc = main(["profile", small_slide, "--model", "vit_tiny", "--tile", "64", "--max-tiles", "2", "--workers", "0",
               "--compare", "fused", "--explain", "gradcam", "--out", out, "--no-progress"])
    assert rc == 2


def test_no_channels_last_runs_nchw(small_slide, tmp_path):
    out = str(tmp_path / "out")
    assert main(["profile", small_slide, "--model", "cbam_resnet18", "--tile", "64", "--batch", "4",
                 "--max-tiles", "4", "--workers", "0", "--compare", "fused", "--no-channels-last",
                 "--out", out, "--no-progress"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["variants"]["fused"]["channels_last"] is False


def test_amp_channels_last_and_trace(small_slide, tmp_path):
    """The GPU defaults, asked for on the CPU: bf16 autocast and channels_last tiles and model for
    every variant, and a torch.profiler trace per variant's pass."""
    out = str(tmp_path / "out")
    rc = main(["profile", small_slide, "--model", "cbam_resnet18", "--tile", "64", "--batch", "4",
               "--max-tiles", "4", "--workers", "0", "--compare", "naive,fused", "--amp", "bf16",
               "--channels-last", "--trace", "--train", "--out", out, "--no-progress"])
    assert rc == 0
    report = json.load(open(os.path.join(out, "report.json")))
    for name, fig in report["variants"].items():
        assert fig["amp"] == "bfloat16" and fig["channels_last"] is True, name
        trace = os.path.join(out, f"trace-{name.replace(' (train)', '-train')}.json")
        assert os.path.getsize(trace) > 0, trace
        assert "traceEvents" in open(trace).read(200_000)
    assert report["variants"]["fused"]["same_predictions_as_naive"] >= 0.75  # bf16 rounding may flip a tie
    with pytest.raises(SystemExit) as e:  # argparse's own one-line error
        main(["profile", small_slide, "--amp", "fp8", "--out", out, "--no-progress"])
    assert e.value.code == 2


def test_compile_variant_agrees(small_slide, tmp_path):
    out = str(tmp_path / "out")
    rc = main(["profile", small_slide, "--model", "cbam_resnet18", "--tile", "128", "--batch", "4",
               "--max-tiles", "4", "--workers", "0", "--compare", "naive,compile", "--out", out, "--no-progress"])
    assert rc == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["variants"]["compile"]["same_predictions_as_naive"] == 1.0


@pytest.mark.parametrize("argv,message", [
    (["/nonexistent/slide.svs"], "no such file"),
    (["{blank}"], "no tissue found"),
    (["{slide}", "--tile", "4096"], "larger than level 0"),
    (["{slide}", "--model", "alexnet"], "unknown model 'alexnet'"),
    (["{slide}", "--compare", "naive,turbo"], "unknown variant 'turbo'"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, small_slide, blank_slide, tmp_path, capsys):
    argv = [a.format(slide=small_slide, blank=blank_slide) for a in argv]
    rc = main(["profile", *argv, "--out", str(tmp_path / "o"), "--no-progress", "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("attnkern profile: error:") and message in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_not_a_slide_file(tmp_path, capsys):
    p = tmp_path / "x.tiff"
    p.write_bytes(b"II*\x00garbage")
    rc = main(["profile", str(p), "--out", str(tmp_path / "o"), "--no-progress"])
    assert rc == 2 and "attnkern profile: error:" in capsys.readouterr().err


def test_sample_slide_is_cached_and_readable(monkeypatch, tmp_path):
    from attnkern.slides import open_slide
    from attnkern.slides.sample import sample_slide_path

    monkeypatch.setenv("ATTNKERN_CACHE", str(tmp_path))
    p = sample_slide_path(size=2048)
    assert p.startswith(str(tmp_path)) and os.path.exists(p)
    mtime = os.path.getmtime(p)
    assert sample_slide_path(size=2048) == p and os.path.getmtime(p) == mtime
    slide = open_slide(p)
    assert slide.dimensions == (2048, 2048) and slide.level_count >= 2
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    thumb = np.asarray(slide.get_thumbnail((256, 256)).convert("RGB"))
    assert thumb.std() > 10  # tissue on glass


def test_sample_slide_written_by_two_at_once(monkeypatch, tmp_path):
    """Two writers of the sample slide at once (both found no cached file) each write a
    temporary file of their own and rename it into place: both succeed, the slide is whole,
    no temporary file is left."""
    import threading

    from attnkern.slides import open_slide, sample
    from attnkern.slides.sample import sample_slide_path

    monkeypatch.setenv("ATTNKERN_CACHE", str(tmp_path))
    both_rendering = threading.Barrier(2, timeout=60)
    render = sample.render

    def render_together(size):
        img = render(size)
        both_rendering.wait()  # neither writes before both have passed the cache check
        return img

    monkeypatch.setattr(sample, "render", render_together)
    paths, errors = [], []

    def run():
        try:
            paths.append(sample_slide_path(size=1024))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(paths)) == 1
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(paths[0]), os.path.basename(paths[0]) + ".sha256"])
    assert open(paths[0] + ".sha256").read().strip() == sample._sha256(paths[0])
    slide = open_slide(paths[0])
    assert slide.dimensions == (1024, 1024) and slide.level_count == 2
    assert np.asarray(slide.read_region((0, 0), 1, (256, 256)).convert("RGB")).std() > 10


def test_damaged_sample_slide_is_written_anew(monkeypatch, tmp_path):
    """A cached sample slide whose bytes changed on disk (its checksum no longer matches) is
    written again instead of failing later with a decoding error; so is one without a checksum."""
    from attnkern.slides import open_slide, sample
    from attnkern.slides.sample import sample_slide_path

    monkeypatch.setenv("ATTNKERN_CACHE", str(tmp_path))
    p = sample_slide_path(size=1024)
    good = open(p, "rb").read()
    with open(p, "r+b") as f:  # zero a stretch of tile data, as a damaged disk would
        f.seek(len(good) // 2)
        f.write(bytes(4096))
    assert sample_slide_path(size=1024) == p
    assert open(p, "rb").read() == good
    os.remove(p + ".sha256")
    assert sample_slide_path(size=1024) == p and os.path.exists(p + ".sha256")
    assert np.asarray(open_slide(p).read_region((0, 0), 0, (512, 512)).convert("RGB")).std() > 0


def test_train_steps_are_timed_for_every_variant(small_slide, tmp_path):
    out = str(tmp_path / "out")
    rc = main(["profile", small_slide, "--model", "cbam_resnet18", "--tile", "64", "--batch", "4",
               "--max-tiles", "8", "--workers", "0", "--compare", "naive,fused", "--train", "--out", out,
               "--no-progress"])
    assert rc == 0
    variants = json.load(open(os.path.join(out, "report.json")))["variants"]
    assert set(variants) == {"naive", "fused", "naive (train)", "fused (train)"}
    assert variants["fused (train)"]["tiles"] == 8 and variants["fused (train)"]["tiles_per_s"] > 0


def test_interrupted_run_leaves_a_partial_report(small_slide, tmp_path, monkeypatch, capsys):
    from attnkern.slides import profile as prof

    real = prof.run_variant
    calls = []

    def interrupt_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(prof, "run_variant", interrupt_second)
    out = str(tmp_path / "out")
    rc = main(["profile", small_slide, "--model", "cbam_resnet18", "--tile", "64", "--batch", "4",
               "--max-tiles", "4", "--workers", "0", "--compare", "naive,fused", "--out", out, "--no-progress"])
    assert rc == 130
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["partial"] is True and list(report["variants"]) == ["naive"]
    assert "partial report" in capsys.readouterr().err


def test_two_process_torchrun_shards_the_tiles(small_slide, tmp_path):
    """torchrun with 2 CPU processes (gloo): each rank takes half the tiles, rank 0 writes one
    report covering all of them, with the same predictions as one process."""
    import subprocess
    import sys

    out = str(tmp_path / "dist")
    env = dict(os.environ, OMP_NUM_THREADS="1", ATTNKERN_CACHE=str(tmp_path / "cache"))

    def torchrun(port):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
               "-m", "attnkern.cli", "profile", small_slide, "--model", "cbam_resnet18", "--tile", "64",
               "--batch", "4", "--max-tiles", "10", "--workers", "0", "--compare", "naive,fused", "--out", out,
               "--no-progress"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)

    proc = torchrun(29531)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        # A rank can abort at interpreter exit in gloo's teardown, after its work is done (seen
        # once in about twenty runs, not reproduced since; pytorch/pytorch#190489 reports the
        # same message from torch.distributed's exit). One more run tells that from a failure of
        # the job, which fails both.
        proc = torchrun(29532)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["world_size"] == 2 and report["partial"] is False
    fused = report["variants"]["fused"]
    assert fused["tiles"] == 10 and [r["tiles"] for r in fused["ranks"]] == [5, 5]
    assert fused["same_predictions_as_naive"] == 1.0
    assert os.path.exists(os.path.join(out, "heatmap.png"))
    assert proc.stdout.count("| fused |") == 1  # one report, from rank 0


@pytest.mark.parametrize("model", ["cbam_resnet18", "resnet50"])
def test_gradcam_heatmap(model, small_slide, tmp_path):
    out = str(tmp_path / "out")
    rc = main(["profile", small_slide, "--model", model, "--tile", "64", "--batch", "8", "--max-tiles", "4",
               "--workers", "0", "--compare", "fused", "--explain", "gradcam", "--out", out, "--no-progress"])
    assert rc == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["heatmap"]["kind"] == "gradcam"
    heat = np.load(os.path.join(out, "heatmap.npy"))
    thumb_like = np.asarray(Image.open(os.path.join(out, "mask.png")))
    assert heat.shape == thumb_like.shape[:2] and np.isfinite(heat).any()


def test_attention_heatmap_without_cbam_falls_back_to_probabilities(small_slide, tmp_path):
    out = str(tmp_path / "out")
    rc = main(["profile", small_slide, "--model", "resnet50", "--tile", "64", "--batch", "8", "--max-tiles", "4",
               "--workers", "0", "--compare", "naive", "--out", out, "--no-progress"])
    assert rc == 0
    assert json.load(open(os.path.join(out, "report.json")))["heatmap"]["kind"] == "probability_class_1"
