"""Tissue mask, tiling and tile reading on small generated slides."""
import numpy as np
import pytest

from attnkern.slides import SlideError, TileDataset, open_slide, tile_grid, tissue_mask


def _mask(path, size=512):
    slide = open_slide(path)
    thumb = np.asarray(slide.get_thumbnail((size, size)).convert("RGB"))
    return slide, thumb, tissue_mask(thumb)


def test_blank_slide_has_no_tissue_and_no_tiles(blank_slide):
    slide, _, mask = _mask(blank_slide)
    assert not mask.any()
    assert len(tile_grid(slide, mask, 0, 128)) == 0


def test_islands_give_tiles_over_them_only(small_slide):
    slide, thumb, mask = _mask(small_slide)
    assert 0.05 < mask.mean() < 0.6
    coords = tile_grid(slide, mask, 0, 128)
    assert coords
    for x, y in coords.coords[:: max(1, len(coords) // 12)]:  # the tiles really hold tissue pixels
        tile = np.asarray(slide.read_region((x, y), 0, (128, 128)).convert("RGB")).astype(int)
        non_glass = (np.abs(tile - np.array([242, 242, 246])).max(axis=2) > 20).mean()
        assert non_glass > 0.15, (x, y, non_glass)
    glass = np.median(thumb[~mask], axis=0)  # what is not tissue really is glass
    assert np.abs(glass - np.array([242, 242, 246])).max() <= 3


def test_single_island_gives_its_tiles(tmp_path):
    from skimage import data

    from attnkern.slides.sample import write_pyramid

    img = np.full((1024, 1024, 3), 242, np.uint8)
    img[256:768, 256:768] = data.immunohistochemistry()  # one 512 px island
    path = str(tmp_path / "one.tiff")
    write_pyramid(path, img, downsamples=(1, 4))
    slide, _, mask = _mask(path, 256)
    coords = tile_grid(slide, mask, 0, 128)
    xs, ys = {x for x, _ in coords}, {y for _, y in coords}
    assert min(xs) >= 256 - 128 and max(xs) <= 768 and min(ys) >= 256 - 128 and max(ys) <= 768
    assert len(coords) >= 12  # the 4 x 4 tiles inside the island, give or take the edges


def test_tile_dataset_reads_normalised_tiles(small_slide):
    slide, _, mask = _mask(small_slide)
    grid = tile_grid(slide, mask, 1, 64)
    assert grid.level == 1 and grid.read_size == 64 and grid.size0 == 64 * slide.level_downsamples[1]
    ds = TileDataset(small_slide, grid)
    x, i = ds[0]
    assert x.shape == (3, 64, 64) and i == 0
    assert -3 < float(x.mean()) < 3
    # the tile is the level-1 region at the grid's level-0 coordinates
    want = np.asarray(slide.read_region(grid.coords[0], 1, (64, 64)).convert("RGB"))
    assert np.array_equal(ds.read(0), want)


def test_bad_tile_and_level(small_slide):
    slide, _, mask = _mask(small_slide)
    with pytest.raises(SlideError, match="larger than level 2"):
        tile_grid(slide, mask, 2, 512)
    with pytest.raises(SlideError, match="level 7 does not exist"):
        tile_grid(slide, mask, 7, 64)


def test_open_errors(tmp_path, small_slide):
    with pytest.raises(SlideError, match="no such file"):
        open_slide(str(tmp_path / "missing.svs"))
    txt = tmp_path / "notes.txt"
    txt.write_text("not a slide")
    with pytest.raises(SlideError, match="not a slide"):
        open_slide(str(txt))
    data = open(small_slide, "rb").read()
    cut = tmp_path / "truncated.tiff"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(SlideError):
        open_slide(str(cut))
