"""The tissue mask keeps stained tissue, light or dark, and drops glass and the dark areas
(pure black, near-black noise, dark grey) that scanners and file converters leave."""
import numpy as np
import pytest

from attnkern.slides import open_slide, tile_grid, tissue_mask

from .synthetic import GLASS, dark_quarter_slide, ellipse, glass, near_black, stain


def _inner(region, margin=6):
    """The part of a boolean region at least ``margin`` px from its border (the blur and the
    resampling blend the border with its neighbours)."""
    from scipy.ndimage import binary_erosion

    return binary_erosion(region, iterations=margin)


def test_dark_areas_next_to_tissue():
    """Side by side on glass: normal and dark-stained tissue, pure black, near-black noise and
    dark grey (noisy, neutral and tinted): tissue is kept, every dark area is dropped."""
    rng = np.random.default_rng(1)
    h, w = 384, 640
    img = glass((h, w))
    regions = {}

    def put(name, y0, x0, y1, x1, pixels):
        img[y0:y1, x0:x1] = pixels
        r = np.zeros((h, w), bool)
        r[y0:y1, x0:x1] = True
        regions[name] = r

    put("tissue", 20, 20, 180, 200, stain(rng, (160, 180)))
    # dark-stained tissue: dense haematoxylin, and DAB-brown, both far darker than the usual
    put("dark_tissue", 20, 220, 180, 400, stain(rng, (160, 180), light=(110, 60, 150), dark=(70, 35, 100)))
    put("dab", 20, 420, 180, 600, stain(rng, (160, 180), light=(150, 100, 60), dark=(90, 55, 35)))
    # dark non-tissue right next to the tissue (touching it)
    put("black", 180, 20, 360, 200, 0)
    put("near_black", 180, 200, 360, 400, near_black(rng, (180, 200)))
    grey = np.clip(rng.normal(60, 3, (180, 120, 3)), 0, 255).astype(np.uint8)
    put("dark_grey", 180, 400, 360, 520, grey)
    tinted = np.clip(rng.normal((36, 30, 44), 3, (180, 120, 3)), 0, 255).astype(np.uint8)
    put("dark_tinted", 180, 520, 360, 640, tinted)

    mask = tissue_mask(img)
    for name in ("tissue", "dark_tissue", "dab"):
        inner = _inner(regions[name])
        assert mask[inner].mean() > 0.99, (name, mask[inner].mean())
    for name in ("black", "near_black", "dark_grey", "dark_tinted"):
        inner = _inner(regions[name])
        assert mask[inner].mean() == 0.0, (name, mask[inner].mean())
    glass_px = _inner(~np.any(list(regions.values()), axis=0))
    assert mask[glass_px].mean() == 0.0


def test_near_black_quarter_gives_no_tiles(tmp_path):
    """The 2048 x 2048 slide (levels 1 and 4, 0.5 um/px) with three islands on the left and
    near-black noise over the right quarter: no tissue in the quarter and no tile from it; the
    islands' tiles are all there."""
    from attnkern.slides.sample import write_pyramid

    img, islands = dark_quarter_slide()
    path = str(tmp_path / "dark.tiff")
    write_pyramid(path, img, downsamples=(1, 4), mpp=0.5)
    slide = open_slide(path)
    thumb = np.asarray(slide.get_thumbnail((1024, 1024)).convert("RGB"))
    mask = tissue_mask(thumb)
    q = mask.shape[1] * 3 // 4
    assert mask[:, q:].sum() == 0
    small = islands[::2, ::2]  # the islands at thumbnail scale
    assert mask[_inner(small)].mean() > 0.99
    assert mask[_inner(~small)].mean() == 0.0
    grid = tile_grid(slide, mask, 0, 256)
    xs = [x for x, _ in grid.coords]
    assert max(xs) + 256 <= 1536, "a tile from the dark quarter"
    # every 256 px tile that is mostly island (by the islands' own geometry) is found
    want = {(x, y) for y in range(0, 2048, 256) for x in range(0, 2048, 256)
            if islands[y:y + 256, x:x + 256].mean() >= 0.4}
    assert want and want <= set(grid.coords)


def test_sample_slide_tissue_is_found():
    """On the built-in sample's pixels (here at 2048 px), the mask stays inside the islands,
    covers the stained part of each (the texture has unstained gaps), keeps the darkest
    (DAB-stained) tissue pixels, and every tile that lies inside an island is a tissue tile."""
    from attnkern.slides.sample import render

    img = render(2048)
    truth = np.abs(img.astype(int) - np.array(GLASS)).max(axis=2) > 0
    thumb, small = img[::2, ::2], truth[::2, ::2]
    mask = tissue_mask(thumb)
    assert mask[_inner(~small)].mean() == 0.0
    assert mask[_inner(small)].mean() > 0.5
    v = thumb.max(axis=2)
    dark = _inner(small) & (v < np.percentile(v[small], 2))
    assert dark.sum() > 100 and mask[dark].mean() > 0.97  # the rest: dark specks in unstained gaps
    # the brightness floor costs the sample no tissue pixel at all
    assert np.array_equal(mask, tissue_mask(thumb, min_value=0))

    class Slide:  # tile_grid needs the geometry only
        level_count, level_dimensions, level_downsamples = 1, [(2048, 2048)], [1.0]
        dimensions, properties = (2048, 2048), {}

    grid = tile_grid(Slide, mask, 0, 128)
    inside = {(x, y) for y in range(0, 2048, 128) for x in range(0, 2048, 128) if truth[y:y + 128, x:x + 128].all()}
    assert len(inside) > 20 and inside <= set(grid.coords)


def test_bad_thumbnail():
    with pytest.raises(ValueError, match="thumbnail must be"):
        tissue_mask(np.zeros((8, 8), np.uint8))
