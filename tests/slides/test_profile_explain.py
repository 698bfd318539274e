"""attnkern profile --explain cam / guided-gradcam and --sample K on a small generated slide."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from attnkern.cli import main

BASE = ["--tile", "64", "--batch", "4", "--workers", "0", "--no-progress"]


def test_explain_cam_in_the_timed_pass(small_slide, tmp_path, capsys):
    """CAM of every profiled tile comes from the timed forward of every variant; the heatmap
    is stitched from them; the report gives its cost; no other pass runs for it."""
    out = str(tmp_path / "cam")
    rc = main(["profile", small_slide, "--model", "cbam_resnet18", "--max-tiles", "6", "--compare", "naive,fused",
               "--explain", "cam", "--out", out, *BASE])
    assert rc == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["heatmap"]["kind"] == "cam_class_1"
    assert report["cam"]["layer"] == "layer4" and report["cam"]["classifier"] == "fc"
    for v in ("naive", "fused"):
        f = report["variants"][v]
        assert 0 < f["cam_seconds"] < f["compute_seconds"] and f["cam_share"] == pytest.approx(
            f["cam_seconds"] / f["compute_seconds"])
    assert report["variants"]["fused"]["same_predictions_as_naive"] == 1.0
    heat = np.asarray(Image.open(os.path.join(out, "heatmap.png")).convert("RGB"))
    assert heat.shape[:2] == np.asarray(Image.open(os.path.join(out, "mask.png"))).shape
    assert "CAM of class 1 inside the timed forward" in capsys.readouterr().out


def test_cam_maps_are_the_models_cam(small_slide, tmp_path):
    """The maps CamPass keeps are attnkern.explain.cam's for the same tiles."""
    from attnkern.explain import cam
    from attnkern.slides.explain_tiles import CamPass
    from attnkern.slides.profile import build_model
    from attnkern.slides.reader import open_slide
    from attnkern.slides.tiling import TileDataset

    model = build_model("cbam_resnet18", 2, None)
    slide = open_slide(small_slide)
    ds = TileDataset(small_slide, [(512, 512), (1024, 1024), (0, 0)], 0, 64)
    x = torch.stack([ds[i][0] for i in range(3)])
    p = CamPass(model, 1)
    with torch.inference_mode():
        p(x[:1])                       # a warm-up batch, dropped
        p(x)
    fig = dict(compute_seconds=1.0)
    maps = p.finish([7, 8, 9], fig)
    ref = cam(model, x, target=1).maps.numpy()
    for j, i in enumerate([7, 8, 9]):
        np.testing.assert_allclose(maps[i], ref[j], rtol=1e-5, atol=1e-5)
    assert not model.global_pool._forward_pre_hooks and slide.level_count == 3


def test_explain_guided_gradcam_gallery(small_slide, tmp_path):
    out = str(tmp_path / "gg")
    rc = main(["profile", small_slide, "--model", "cbam_resnet18", "--max-tiles", "4", "--compare", "naive",
               "--explain", "guided-gradcam", "--out", out, *BASE])
    assert rc == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["heatmap"]["kind"] == "gradcam"
    g = report["gallery"]
    assert g["file"] == "gallery.png" and len(g["tiles"]) == 4
    scores = [t["score"] for t in g["tiles"]]
    assert scores == sorted(scores, reverse=True)
    img = Image.open(os.path.join(out, "gallery.png"))
    assert img.size[0] == 4 * 160 and img.size[1] > 4 * 160
    # a ViT has no GAP + linear head: refused with a one-line error, exit 2
    rc = main(["profile", small_slide, "--model", "vit_tiny", "--max-tiles", "2", "--compare", "naive",
               "--explain", "cam", "--out", out, *BASE])
    assert rc == 2


def test_sample_beside_the_exhaustive_run(small_slide, tmp_path, capsys):
    """--sample 5 of 12 profiled tiles (with --explain cam, so no heatmap pass runs), then
    --sample 12: every profiled tile, so the estimate is the exhaustive prediction exactly."""
    out = str(tmp_path / "s")
    args = ["profile", small_slide, "--model", "cbam_resnet18", "--max-tiles", "12", "--compare", "naive",
            "--explain", "cam", *BASE]
    assert main(args + ["--sample", "5", "--out", out]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    s = report["sampled"]
    assert s["k"] == 5 and s["population"] == 12 and s["variant"] == "naive"
    assert s["coarse_level"] == 2 and s["sampled"]["working_tiles"] == 5
    assert s["sampled"]["tiles_read"] == s["sampled"]["coarse_tiles"] + 5
    assert len(set(s["sampled"]["tiles"])) == 5
    assert sum(s["sampled"]["weights"]) == pytest.approx(1.0)
    for run in ("sampled", "exhaustive"):
        assert sum(s[run]["prediction"]) == pytest.approx(1.0, abs=1e-5)
        assert s[run]["tiles_per_s"] > 0
    est, full = np.array(s["sampled"]["prediction"]), np.array(s["exhaustive"]["prediction"])
    assert s["distance"]["l1"] == pytest.approx(np.abs(est - full).sum())
    assert "| sampled |" in capsys.readouterr().out
    assert main(args + ["--sample", "12", "--out", out + "2"]) == 0
    s2 = json.load(open(os.path.join(out + "2", "report.json")))["sampled"]
    np.testing.assert_allclose(s2["sampled"]["prediction"], s2["exhaustive"]["prediction"], rtol=0, atol=1e-6)


def test_sample_errors(small_slide):
    from attnkern.slides.profile import build_model
    from attnkern.slides.reader import SlideError, open_slide
    from attnkern.slides.sampled import sampled_run

    slide = open_slide(small_slide)
    mask = np.ones((256, 256), bool)
    fig = dict(tiles=2, seconds=1.0)
    with pytest.raises(SlideError, match="between 1 and the 2 profiled tiles"):
        sampled_run(build_model("cbam_resnet18", 2, None), slide, small_slide, mask, [(0, 0), (64, 0)], 0, 64, 3,
                    fig, {}, 2, 4, "cpu", 2)
    with pytest.raises(SlideError, match="global average pooling"):
        sampled_run(build_model("vit_tiny", 2, None), slide, small_slide, mask, [(0, 0), (64, 0)], 0, 64, 1,
                    fig, {}, 2, 4, "cpu", 2)
    with pytest.raises(SlideError, match="needs a level coarser than level 2"):
        sampled_run(build_model("cbam_resnet18", 2, None), slide, small_slide, mask, [(0, 0), (64, 0)], 2, 64, 1,
                    fig, {}, 2, 4, "cpu", 2)
