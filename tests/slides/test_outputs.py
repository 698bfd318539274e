"""Tiles by resolution (--mpp, --magnification), tiles that stay with their level, and the
per-tile outputs (CSV, GeoJSON for QuPath, the stitched map)."""
import csv
import json
import os

import numpy as np
import pytest
import torch

from attnkern.cli import main
from attnkern.slides import SlideError, TileDataset, open_slide, resolution_grid, tissue_mask
from attnkern.slides.sample import write_pyramid

from .synthetic import ellipse, glass, stain


def _smooth_tissue(size, seed=0):
    """Glass with one large island of smooth stain (resampling filters agree on smooth images)."""
    rng = np.random.default_rng(seed)
    img = glass((size, size))
    island = ellipse((size, size), size / 2, size / 2, size * 0.38, size * 0.42)
    img[island] = stain(rng, (size, size), noise=0.0)[island]
    return img


@pytest.fixture(scope="module")
def mpp_slide(tmp_path_factory):
    """1024 px, levels at 0.25, 1.0 and 4.0 um/px (downsamples 1, 4, 16)."""
    path = str(tmp_path_factory.mktemp("mpp") / "mpp.tiff")
    img = _smooth_tissue(1024)
    write_pyramid(path, img, downsamples=(1, 4, 16), tile=64, mpp=0.25)
    return path, img


def _mask(slide):
    return tissue_mask(np.asarray(slide.get_thumbnail((512, 512)).convert("RGB")))


@pytest.mark.parametrize("mpp,tile,level,read", [
    (0.25, 64, 0, 64),   # level 0 as is
    (0.5, 64, 0, 128),   # between levels: read at the finer one, resized
    (1.0, 32, 1, 32),
    (2.0, 32, 1, 64),
    (4.0, 16, 2, 16),
    (8.0, 16, 2, 32),    # coarser than every level: from the coarsest
])
def test_mpp_reads_the_nearest_finer_level(mpp_slide, mpp, tile, level, read):
    path, img = mpp_slide
    slide = open_slide(path)
    grid = resolution_grid(slide, _mask(slide), tile, mpp=mpp)
    assert (grid.level, grid.read_size, grid.tile) == (level, read, tile)
    assert grid.mpp == pytest.approx(mpp)
    assert grid.size0 * 0.25 == pytest.approx(tile * mpp)  # a tile covers tile x mpp microns
    assert len(grid) > 0
    ds = TileDataset(path, grid)
    for i in (0, len(grid) // 2, len(grid) - 1):
        x, y = grid.coords[i]
        s = int(grid.size0)
        assert x + s <= 1024 and y + s <= 1024
        got = ds.read(i).astype(float)
        # the same microns of level 0, averaged down to the tile's pixels
        want = img[y:y + s, x:x + s].astype(float).reshape(tile, s // tile, tile, s // tile, 3).mean(axis=(1, 3))
        assert got.shape == (tile, tile, 3)
        assert np.abs(got - want).mean() < 4, (i, np.abs(got - want).mean())


def test_magnification_and_resolution_errors(mpp_slide, tmp_path):
    path, _ = mpp_slide
    slide = open_slide(path)
    mask = _mask(slide)
    g = resolution_grid(slide, mask, 64, magnification=20)  # no objective power: 20x = 0.5 um/px
    assert (g.level, g.read_size) == (0, 128) and g.mpp == pytest.approx(0.5)
    with pytest.raises(SlideError, match="finer than the slide's level 0"):
        resolution_grid(slide, mask, 64, mpp=0.1)
    with pytest.raises(SlideError, match="must be > 0"):
        resolution_grid(slide, mask, 64, mpp=-1.0)
    bare = str(tmp_path / "bare.tiff")
    write_pyramid(bare, _smooth_tissue(512), downsamples=(1, 4), tile=64, mpp=None)
    s2 = open_slide(bare)
    with pytest.raises(SlideError, match="no openslide.mpp-x"):
        resolution_grid(s2, _mask(s2), 64, mpp=0.5)
    with pytest.raises(SlideError, match="records neither"):
        resolution_grid(s2, _mask(s2), 64, magnification=20)


def test_mpp_without_metadata_is_one_line(tmp_path, capsys):
    bare = str(tmp_path / "bare.tiff")
    write_pyramid(bare, _smooth_tissue(512), downsamples=(1, 4), tile=64, mpp=None)
    rc = main(["profile", bare, "--mpp", "0.5", "--tile", "32", "--out", str(tmp_path / "o"), "--no-progress",
               "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("attnkern profile: error:") and "--level" in err
    assert len(err.splitlines()) == 1
    with pytest.raises(SystemExit):  # --level and --mpp exclude each other
        main(["profile", bare, "--mpp", "0.5", "--level", "1"])


def _rows(out):
    with open(os.path.join(out, "tiles.csv")) as f:
        return list(csv.DictReader(f))


def test_profile_at_mpp_writes_tiles_geojson_and_map(mpp_slide, tmp_path):
    """--mpp 2.0 --tile 32 on levels 0.25/1/4 um/px: tiles of 64 um (256 level-0 px) read at
    level 1; the CSV and the GeoJSON hold one entry per scored tile, inside the slide."""
    path, _ = mpp_slide
    out = str(tmp_path / "out")
    rc = main(["profile", path, "--mpp", "2.0", "--model", "cbam_resnet18", "--tile", "32", "--batch", "8",
               "--max-tiles", "4", "--workers", "0", "--compare", "fused", "--out", out, "--no-progress"])
    assert rc == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["tiles"]["effective_mpp"] == pytest.approx(2.0)
    assert (report["tiles"]["level"], report["tiles"]["read_size"]) == (1, 64)
    assert "2 um/px" in open(os.path.join(out, "report.md")).read()
    rows = _rows(out)
    hm = report["heatmap"]
    assert len(rows) == hm["tiles"] > 0
    for r in rows:
        assert float(r["size"]) * 0.25 == pytest.approx(64.0)  # microns: 32 px x 2 um/px
        assert int(r["level"]) == 1
        p = [float(r[k]) for k in ("prob_class_0", "prob_class_1")]
        assert sum(p) == pytest.approx(1.0, abs=1e-5) and int(r["predicted_class"]) == int(np.argmax(p))
    gj = json.load(open(os.path.join(out, "tiles.geojson")))
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(rows)
    W0, H0 = report["slide"]["dimensions"]
    seen = set()
    for f, r in zip(gj["features"], rows):
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        ring = np.array(f["geometry"]["coordinates"][0], float)
        assert ring.shape == (5, 2) and (ring[0] == ring[-1]).all()
        assert ring[:, 0].min() >= 0 and ring[:, 1].min() >= 0 and ring[:, 0].max() <= W0 and ring[:, 1].max() <= H0
        assert (ring[:, 0].min(), ring[:, 1].min()) == (float(r["x"]), float(r["y"]))
        assert ring[:, 0].max() - ring[:, 0].min() == pytest.approx(float(r["size"]))
        props = f["properties"]
        assert props["objectType"] == "tile"
        assert props["measurements"]["score"] == pytest.approx(float(r["score"]))
        assert props["measurements"]["prob_class_1"] == pytest.approx(float(r["prob_class_1"]))
        seen.add((r["x"], r["y"]))
    assert len(seen) == len(rows)  # one feature per tile
    heat = np.load(os.path.join(out, "heatmap.npy"))
    assert np.isfinite(heat).sum() > 0


def test_heatmap_skips_a_level_that_cannot_hold_a_tile(tmp_path):
    """1280 x 1280 px with one more level of 20 x 20 px (downsample 64) and --tile 32: the
    level-0 tissue tiles are too many for the heatmap's limit and the 20 px level cannot hold a
    tile, so the heatmap reads its tiles at level 0, at level-0 coordinates; each tile's
    probabilities are those of the model on that level-0 region."""
    import attnkern
    from attnkern.slides.profile import build_model

    path = str(tmp_path / "tiny-top.tiff")
    write_pyramid(path, _smooth_tissue(1280, seed=3), downsamples=(1, 64), tile=64, mpp=0.5)
    slide = open_slide(path)
    assert slide.level_dimensions[1] == (20, 20)
    out = str(tmp_path / "out")
    rc = main(["profile", path, "--model", "cbam_resnet18", "--tile", "32", "--batch", "64", "--max-tiles", "4",
               "--workers", "0", "--compare", "fused", "--out", out, "--no-progress"])
    assert rc == 0
    report = json.load(open(os.path.join(out, "report.json")))
    hm = report["heatmap"]
    assert (hm["level"], hm["read_size"], hm["tiles"]) == (0, 32, len(_rows(out)))
    assert hm["tiles"] > 256  # more than the limit: no level could take fewer
    rows = _rows(out)
    model = attnkern.convert(build_model("cbam_resnet18", 2, None)).eval()
    from attnkern.slides.tiling import tile_grid

    pick = rows[:: max(1, len(rows) // 6)]
    grid = tile_grid(slide, np.ones((8, 8), bool), 0, 32)
    grid = grid.subset([grid.coords.index((int(r["x"]), int(r["y"]))) for r in pick])
    ds = TileDataset(path, grid)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.inference_mode():
        p = model(x).softmax(dim=1).numpy()
    got = np.array([[float(r["prob_class_0"]), float(r["prob_class_1"])] for r in pick])
    np.testing.assert_allclose(got, p, atol=1e-4)


def test_heatmap_figure_keeps_the_overlay_and_adds_a_colour_bar(tmp_path):
    """heatmap.png holds the overlay pixel for pixel (one per thumbnail pixel), a title, and a
    colour bar from the low to the high end of the colour range (the 2nd and 98th percentiles
    of the scored tissue)."""
    from matplotlib import colormaps
    from PIL import Image

    from attnkern.explain import colour_range, overlay, save_heatmap

    rng = np.random.default_rng(0)
    thumb = rng.integers(0, 255, (120, 200, 3), dtype=np.uint8)
    heat = np.full((120, 200), np.nan, np.float32)
    heat[10:60, 20:120] = rng.random((50, 100)) * 3 - 1
    mask = np.zeros((120, 200), bool)
    mask[:80, :150] = True
    lo, hi = colour_range(heat, mask)
    vals = heat[10:60, 20:120].astype(np.float64).ravel()
    assert (lo, hi) == pytest.approx(tuple(np.percentile(vals, [2, 98])), rel=1e-6)
    path = str(tmp_path / "h.png")
    save_heatmap(path, thumb, heat, mask, title="a title", label="score")
    png = np.asarray(Image.open(path).convert("RGB"))
    assert png.shape[0] > 120 and png.shape[1] > 200  # room for the title and the bar
    assert np.array_equal(png[-120:, :200], overlay(thumb, heat, mask))
    bar = png[:, 200:].reshape(-1, 3).astype(int)
    for end in (0.02, 0.98):  # both ends of the colour map are drawn in the bar
        c = np.round(np.array(colormaps["jet"](end)[:3]) * 255)
        assert (np.abs(bar - c).max(axis=1) <= 12).any(), end
    assert colour_range(np.full((4, 4), np.nan), np.ones((4, 4), bool)) == (0.0, 1.0)
