"""attnkern profile --explain cam / guided-gradcam and --sample K on a small generated slide."""
import csv
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from attnkern.cli import main

BASE = ["--tile", "64", "--batch", "4", "--workers", "0", "--no-progress"]


def level0_grid(coords, tile=64, level=0, downsample=1.0):
    from attnkern.slides.tiling import TileGrid

    return TileGrid(level=level, downsample=downsample, read_size=tile, tile=tile, coords=tuple(coords))


def test_cam_maps_are_the_models_cam(small_slide, tmp_path):
    """The maps CamPass keeps are attnkern.explain.cam's for the same tiles."""
    from attnkern.explain import cam
    from attnkern.slides.explain_tiles import CamPass
    from attnkern.slides.profile import build_model
    from attnkern.slides.reader import open_slide
    from attnkern.slides.tiling import TileDataset

    model = build_model("cbam_resnet18", 2, None)
    slide = open_slide(small_slide)
    ds = TileDataset(small_slide, level0_grid([(512, 512), (1024, 1024), (0, 0)]))
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
    assert "gallery.png" in [f["file"] for f in report["files"]]
    img = Image.open(os.path.join(out, "gallery.png"))
    assert img.size[0] == 4 * 160 and img.size[1] > 4 * 160
    # a ViT has no GAP + linear head: refused with a one-line error, exit 2
    rc = main(["profile", small_slide, "--model", "vit_tiny", "--max-tiles", "2", "--compare", "naive",
               "--explain", "cam", "--out", out, *BASE])
    assert rc == 2


def test_explain_cam_and_sample(small_slide, tmp_path, capsys):
    """--explain cam: CAM of every profiled tile comes from the timed forward of every variant,
    the heatmap is stitched from them (no other pass), the report gives its cost. --sample 5
    of the 12 profiled tiles: the sampled run beside the exhaustive one."""
    out = str(tmp_path / "cam")
    rc = main(["profile", small_slide, "--model", "cbam_resnet18", "--max-tiles", "12", "--compare", "naive,fused",
               "--explain", "cam", "--sample", "5", "--out", out, *BASE])
    assert rc == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["heatmap"]["kind"] == "cam_class_1"
    assert report["cam"]["layer"] == "layer4" and report["cam"]["classifier"] == "fc"
    for v in ("naive", "fused"):
        f = report["variants"][v]
        assert 0 < f["cam_seconds"] < f["compute_seconds"] and f["cam_share"] == pytest.approx(
            f["cam_seconds"] / f["compute_seconds"])
    assert report["variants"]["fused"]["same_predictions_as_naive"] == 1.0
    # the CAM maps go through the same outputs as every heatmap: one row / feature per profiled tile
    assert report["heatmap"]["tiles"] == 12 and report["heatmap"]["level"] == 0
    written = [f["file"] for f in report["files"]]
    for name in ("heatmap.png", "heatmap.npy", "tiles.csv", "tiles.geojson", "mask.png", "report.json"):
        assert name in written
    with open(os.path.join(out, "tiles.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12
    for r in rows:
        assert float(r["prob_class_0"]) + float(r["prob_class_1"]) == pytest.approx(1.0, abs=1e-5)
    geo = json.load(open(os.path.join(out, "tiles.geojson")))
    assert len(geo["features"]) == 12 and "cam_class_1" in geo["features"][0]["properties"]["measurements"]
    heat = np.load(os.path.join(out, "heatmap.npy"))
    assert heat.shape == np.asarray(Image.open(os.path.join(out, "mask.png"))).shape
    assert np.isfinite(heat).any()
    s = report["sampled"]
    assert s["k"] == 5 and s["population"] == 12 and s["variant"] == "fused"
    assert s["coarse_level"] == 2 and s["sampled"]["working_tiles"] == 5
    assert s["sampled"]["tiles_read"] == s["sampled"]["coarse_tiles"] + 5
    assert len(set(s["sampled"]["tiles"])) == 5 and set(s["sampled"]["tiles"]) <= set(range(12))
    assert sum(s["sampled"]["weights"]) == pytest.approx(1.0)
    for run in ("sampled", "exhaustive"):
        assert sum(s[run]["prediction"]) == pytest.approx(1.0, abs=1e-5)
        assert s[run]["tiles_per_s"] > 0
    est, full = np.array(s["sampled"]["prediction"]), np.array(s["exhaustive"]["prediction"])
    assert s["distance"]["l1"] == pytest.approx(np.abs(est - full).sum())
    printed = capsys.readouterr().out
    assert "CAM of class 1 inside the timed forward" in printed and "| sampled |" in printed
    assert "Files written:" in printed and "`tiles.geojson`" in printed


@pytest.mark.parametrize("resized", [False, True], ids=["level", "mpp"])
def test_sampled_run_with_every_tile_is_the_exhaustive_prediction(small_slide, resized):
    """K = the population: the estimate is the attention-weighted mean of the same model's
    tile probabilities, exactly (up to float32 rounding of the probabilities); also for a grid
    of --mpp tiles read at one size and resized to the model's."""
    from attnkern.slides.profile import build_model
    from attnkern.slides.reader import open_slide
    from attnkern.slides.sampled import _probabilities, sampled_run
    from attnkern.slides.tiling import TileDataset, resolution_grid

    model = build_model("cbam_resnet18", 2, None)
    slide = open_slide(small_slide)
    mask = np.ones((256, 256), bool)
    if resized:  # 1 um/px from level 0's 0.5: 128 px read, resized to 64
        grid = resolution_grid(slide, mask, 64, mpp=1.0)
        assert grid.read_size == 128 and grid.level == 0
        grid = grid.subset([5, 40, 100])
    else:
        grid = level0_grid([(512, 512), (1024, 576), (1536, 1024)])
    preds = _probabilities(model, torch.utils.data.DataLoader(TileDataset(small_slide, grid), batch_size=4),
                           "cpu", None, False)
    s = sampled_run(model, slide, small_slide, mask, grid, 3, dict(tiles=3, seconds=1.0),
                    {i: p.tolist() for i, p in preds.items()}, 3, 4, "cpu", 2, seed=3)
    np.testing.assert_allclose(s["sampled"]["prediction"], s["exhaustive"]["prediction"], rtol=0, atol=1e-6)
    assert s["distance"]["same_class"] and sorted(s["sampled"]["tiles"]) == [0, 1, 2]


def test_sample_errors(small_slide):
    from attnkern.slides.profile import build_model
    from attnkern.slides.reader import SlideError, open_slide
    from attnkern.slides.sampled import sampled_run

    slide = open_slide(small_slide)
    mask = np.ones((256, 256), bool)
    fig = dict(tiles=2, seconds=1.0)
    two = level0_grid([(0, 0), (64, 0)])
    with pytest.raises(SlideError, match="between 1 and the 2 profiled tiles"):
        sampled_run(build_model("cbam_resnet18", 2, None), slide, small_slide, mask, two, 3, fig, {}, 2, 4, "cpu", 2)
    with pytest.raises(SlideError, match="global average pooling"):
        sampled_run(build_model("vit_tiny", 2, None), slide, small_slide, mask, two, 1, fig, {}, 2, 4, "cpu", 2)
    with pytest.raises(SlideError, match="needs a level coarser than level 2"):
        sampled_run(build_model("cbam_resnet18", 2, None), slide, small_slide, mask,
                    level0_grid([(0, 0), (512, 0)], level=2, downsample=8.0), 1, fig, {}, 2, 4, "cpu", 2)
    with pytest.raises(TypeError, match="TileGrid"):
        sampled_run(build_model("cbam_resnet18", 2, None), slide, small_slide, mask, [(0, 0), (64, 0)], 1, fig, {},
                    2, 4, "cpu", 2)


def test_coarse_level_counts_the_resolution_the_model_sees():
    """A grid read at 256 px and resized to 128 works at downsample 2: its coarse view is the
    first level at least 8 x 2 = 16 times coarser than level 0, not 8 times."""
    from attnkern.slides.sampled import coarse_level
    from attnkern.slides.tiling import TileGrid

    class Slide:
        level_downsamples = (1.0, 2.0, 8.0, 32.0)
        level_dimensions = ((8192, 8192), (4096, 4096), (1024, 1024), (256, 256))
        level_count = 4

    plain = TileGrid(level=0, downsample=1.0, read_size=128, tile=128)
    resized = TileGrid(level=0, downsample=1.0, read_size=256, tile=128)
    assert coarse_level(Slide, plain) == 2
    assert coarse_level(Slide, resized) == 3


def test_guided_gradcam_of_a_vit_names_the_option():
    from attnkern.slides.profile import _gradcam_target, build_model
    from attnkern.slides.reader import SlideError

    vit = build_model("vit_tiny", 2, None)
    with pytest.raises(SlideError, match="^--explain guided-gradcam needs a convolutional model"):
        _gradcam_target(vit, "--explain guided-gradcam")
    with pytest.raises(SlideError, match="^--explain gradcam needs a convolutional model"):
        _gradcam_target(vit)
