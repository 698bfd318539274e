"""The built-in sample slide: a pyramidal tiled TIFF made from real immunohistochemistry pixels
that scikit-image ships in its wheel (``skimage/data/ihc.png``), arranged as tissue islands on
glass-white background, so no download is ever needed. Written once with tifffile, cached.

Layout that both OpenSlide and tifffile-based readers take: every level in the main IFD chain,
level 0 tiled, lower levels tiled with ``subfiletype=1``, zlib tiles (exact), resolution in
centimetres so the microns-per-pixel reach OpenSlide.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from typing import Optional

import numpy as np

VERSION = 1
SIZE = 16384          # level-0 width and height
DOWNSAMPLES = (1, 4, 16, 64)
TILE = 256
MPP = 0.5             # microns per pixel at level 0 (a 20x scan)


def cache_dir() -> str:
    return os.environ.get("ATTNKERN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "attnkern"))


def _islands(rng: np.random.Generator, size: int):
    """(cy, cx, ry, rx) ellipses of tissue, not overlapping too much, inside the slide."""
    out = []
    tries = 0
    while len(out) < 9 and tries < 500:
        tries += 1
        ry, rx = rng.integers(size // 14, size // 7, size=2)
        cy, cx = rng.integers(ry + size // 40, size - ry - size // 40), rng.integers(rx + size // 40, size - rx - size // 40)
        if all((cy - y) ** 2 + (cx - x) ** 2 > (max(ry, rx) + max(a, b)) ** 2 * 0.8 for y, x, a, b in out):
            out.append((int(cy), int(cx), int(ry), int(rx)))
    return out


def render(size: int = SIZE, seed: int = 0) -> np.ndarray:
    """The level-0 image, [size, size, 3] uint8: IHC texture inside ragged ellipses on white."""
    from skimage import data
    from skimage.transform import resize

    ihc = data.immunohistochemistry()  # 512 x 512 x 3 uint8, from the scikit-image wheel
    rng = np.random.default_rng(seed)
    scale = size / SIZE
    img = np.full((size, size, 3), 242, np.uint8)  # glass
    img[..., 2] = 246
    reps = int(np.ceil(size / ihc.shape[0]))
    # mirrored tiling of the texture, so seams do not show
    row = np.concatenate([ihc if i % 2 == 0 else ihc[:, ::-1] for i in range(reps)], axis=1)
    texture = np.concatenate([row if i % 2 == 0 else row[::-1] for i in range(reps)], axis=0)[:size, :size]
    if scale != 1:
        texture = (resize(ihc, (max(8, int(512 * scale)),) * 2, preserve_range=True).astype(np.uint8))
        texture = np.tile(texture, (int(np.ceil(size / texture.shape[0])),) * 2 + (1,))[:size, :size]
    yy, xx = np.ogrid[:size, :size]
    for cy, cx, ry, rx in _islands(rng, SIZE):
        cy, cx, ry, rx = (int(v * scale) for v in (cy, cx, ry, rx))
        y0, y1, x0, x1 = max(0, cy - ry), min(size, cy + ry), max(0, cx - rx), min(size, cx + rx)
        ang = np.arctan2(yy[y0:y1] - cy, xx[:, x0:x1] - cx)
        ragged = 1 + 0.12 * np.sin(5 * ang + rng.uniform(0, 6.3)) + 0.06 * np.sin(11 * ang + rng.uniform(0, 6.3))
        inside = ((yy[y0:y1] - cy) / ry) ** 2 + ((xx[:, x0:x1] - cx) / rx) ** 2 <= ragged ** 2
        img[y0:y1, x0:x1][inside] = texture[y0:y1, x0:x1][inside]
    return img


def write_pyramid(path: str, img: np.ndarray, downsamples=DOWNSAMPLES, tile: int = TILE,
                  mpp: Optional[float] = MPP) -> None:
    """Write ``img`` as a tiled pyramidal TIFF (see the module docstring) to ``path``, at
    ``mpp`` microns per pixel at level 0 (None: no resolution recorded, as some scanners and
    converters leave it)."""
    res = 1e4 / mpp if mpp else None  # pixels per centimetre
    # A temporary file of its own in the same folder, renamed into place when complete: two
    # processes writing the same slide at once never share a file, and a reader never sees a
    # half-written one (os.replace is atomic within a file system).
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".part")
    os.close(fd)
    try:
        os.chmod(tmp, 0o644)  # mkstemp's file is private to its owner; a slide is not
        _write_levels(tmp, img, downsamples, tile, res)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def _write_levels(tmp: str, img: np.ndarray, downsamples, tile: int, res: Optional[float]) -> None:
    import tifffile

    with tifffile.TiffWriter(tmp, bigtiff=img.nbytes > 2 ** 31) as tif:
        level = img
        for i, d in enumerate(downsamples):
            if i:
                f = d // downsamples[i - 1]
                h, w = level.shape[0] // f * f, level.shape[1] // f * f
                level = level[:h, :w].reshape(h // f, f, w // f, f, 3).mean(axis=(1, 3)).astype(np.uint8)
            tif.write(level, tile=(tile, tile), compression="zlib", photometric="rgb",
                      subfiletype=1 if i else 0,
                      resolution=(res / d, res / d) if res else (1, 1),
                      resolutionunit="CENTIMETER" if res else "NONE",
                      description=f"attnkern sample slide level {i}" if i else "attnkern sample slide")


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_slide_path(size: int = SIZE) -> str:
    """The cached sample slide, created on first use (about a minute on 2 cores). Its SHA-256
    is kept next to it (``.sha256``) and checked on every use (about half a second for the
    full-size slide): a cached file that was damaged on disk, or one without its checksum, is
    written anew instead of failing mid-run with a decoding error."""
    folder = cache_dir()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"sample-slide-v{VERSION}-{size}.tiff")
    checksum = path + ".sha256"
    with contextlib.suppress(OSError):
        with open(checksum) as f:
            if os.path.exists(path) and f.read().strip() == _sha256(path):
                return path
    downs = tuple(d for d in DOWNSAMPLES if size // d >= 256)
    write_pyramid(path, render(size), downsamples=downs)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(checksum) + ".", suffix=".part")
    with os.fdopen(fd, "w") as f:
        f.write(_sha256(path) + "\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, checksum)
    return path
