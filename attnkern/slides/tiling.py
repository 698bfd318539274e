"""Tiles over the tissue of a slide, and a Dataset that reads them (each DataLoader worker
opens its own slide handle).

A :class:`TileGrid` carries the tiles' level-0 coordinates together with the pyramid level they
are read from and the size read there, so no code can read a tile at coordinates of another
level. Tiles are chosen by level (``tile_grid``) or by resolution in microns per pixel or as a
magnification (``resolution_grid``: read at the nearest finer level and resized).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from .reader import SlideError, open_slide

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MPP_TOLERANCE = 0.02  # a level within 2% of the asked resolution is read as is


@dataclass(frozen=True)
class TileGrid:
    """Square tiles read at one pyramid level.

    level: the pyramid level read; downsample: that level's downsample from level 0;
    read_size: tile side in pixels at ``level``; tile: the side the model gets (the read is
    resized to it when the two differ); coords: level-0 (x, y) of each tile's top-left corner;
    mpp: microns per pixel of the model's tiles (None when the slide has no resolution).
    """
    level: int
    downsample: float
    read_size: int
    tile: int
    coords: Tuple[Tuple[int, int], ...] = ()
    mpp: Optional[float] = None

    @property
    def size0(self) -> float:
        """The side of a tile in level-0 pixels."""
        return self.read_size * self.downsample

    def __len__(self) -> int:
        return len(self.coords)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return iter(self.coords)

    def subset(self, indices: Sequence[int]) -> "TileGrid":
        """The same grid with only the tiles at ``indices``, in that order."""
        return replace(self, coords=tuple(self.coords[i] for i in indices))

    def describe(self) -> dict:
        return dict(level=self.level, downsample=self.downsample, read_size=self.read_size, tile=self.tile,
                    size0=self.size0, mpp=self.mpp, tiles=len(self.coords))


def slide_mpp(slide) -> Optional[float]:
    """Level-0 microns per pixel (``openslide.mpp-x``, or the mean with ``mpp-y``), or None."""
    vals = []
    for key in ("openslide.mpp-x", "openslide.mpp-y"):
        try:
            v = float(slide.properties.get(key, "nan"))
        except ValueError:
            continue
        if np.isfinite(v) and v > 0:
            vals.append(v)
    return float(np.mean(vals)) if vals else None


def tile_grid(slide, mask: np.ndarray, level: int, tile: int, min_tissue: float = 0.25,
              read_size: Optional[int] = None) -> TileGrid:
    """Every tile of ``read_size`` px (default ``tile``) at ``level``, given to the model at
    ``tile`` px, whose area is at least ``min_tissue`` tissue according to ``mask`` (a
    thumbnail-scale boolean mask of the whole slide). Tiles lie inside the level and inside
    level 0. Raises :class:`SlideError` for a level that does not exist or cannot hold a tile."""
    if not 0 <= level < slide.level_count:
        raise SlideError(f"level {level} does not exist: the slide has levels 0..{slide.level_count - 1}")
    read = int(read_size or tile)
    W, H = slide.level_dimensions[level]
    if read > W or read > H:
        raise SlideError(f"tile {read} px is larger than level {level} ({W} x {H} px)")
    d = float(slide.level_downsamples[level])
    W0, H0 = slide.dimensions
    mpp0 = slide_mpp(slide)
    grid = TileGrid(level=level, downsample=d, read_size=read, tile=int(tile),
                    mpp=None if mpp0 is None else mpp0 * d * read / tile)
    mh, mw = mask.shape
    sy, sx = mh / H0, mw / W0
    coords = []
    step0 = grid.size0
    for ty in range(H // read):
        for tx in range(W // read):
            x0, y0 = tx * step0, ty * step0
            if x0 + step0 > W0 + 0.5 or y0 + step0 > H0 + 0.5:
                continue
            m = mask[int(y0 * sy):max(int(y0 * sy) + 1, int((y0 + step0) * sy)),
                     int(x0 * sx):max(int(x0 * sx) + 1, int((x0 + step0) * sx))]
            if m.size and m.mean() >= min_tissue:
                coords.append((int(round(x0)), int(round(y0))))
    return replace(grid, coords=tuple(coords))


def target_downsample(slide, mpp: Optional[float] = None, magnification: Optional[float] = None) -> Tuple[float, str]:
    """The level-0 downsample that gives ``mpp`` microns per pixel, or ``magnification`` (from
    the slide's objective power when it has one, else as 10 / magnification um/px, the usual
    convention: 20x = 0.5 um/px), and how it was found. Raises :class:`SlideError` when the
    slide lacks the metadata, or the resolution is finer than level 0."""
    if (mpp is None) == (magnification is None):
        raise ValueError("give exactly one of mpp and magnification")
    mpp0 = slide_mpp(slide)
    if magnification is not None:
        if not magnification > 0:
            raise SlideError(f"--magnification must be > 0, got {magnification}")
        power = slide.properties.get("openslide.objective-power")
        try:
            power = float(power) if power is not None else None
        except ValueError:
            power = None
        if power:
            d, how = power / magnification, f"objective power {power:g}x / {magnification:g}x"
        elif mpp0 is not None:
            d, how = (10.0 / magnification) / mpp0, f"{magnification:g}x taken as {10.0 / magnification:g} um/px"
        else:
            raise SlideError("--magnification needs the slide's objective power or its microns per pixel, "
                             "and this slide records neither (no openslide.objective-power, no openslide.mpp-x); "
                             "choose tiles with --level instead")
    else:
        if not mpp > 0:
            raise SlideError(f"--mpp must be > 0, got {mpp}")
        if mpp0 is None:
            raise SlideError("--mpp needs the slide's resolution, and this slide records none "
                             "(no openslide.mpp-x); choose tiles with --level instead")
        d, how = mpp / mpp0, f"{mpp:g} um/px over level 0's {mpp0:g} um/px"
    if d < 1 - MPP_TOLERANCE:
        finest = f"{mpp0:g} um/px" if mpp0 else "level 0"
        raise SlideError(f"the asked resolution ({how}) is finer than the slide's level 0 ({finest}); "
                         "tiles are never upsampled")
    return max(d, 1.0), how


def resolution_grid(slide, mask: np.ndarray, tile: int, mpp: Optional[float] = None,
                    magnification: Optional[float] = None, min_tissue: float = 0.25) -> TileGrid:
    """Tiles of ``tile`` px at ``mpp`` microns per pixel (or at ``magnification``), whatever
    levels the slide has: read at the nearest finer level (the coarsest level whose downsample
    is at most the one asked, within 2%) over the same level-0 extent and resized to ``tile``.
    The grid's ``mpp`` is the effective resolution (the read size is rounded to whole
    pixels)."""
    d, _ = target_downsample(slide, mpp, magnification)
    level = 0
    for i, di in enumerate(slide.level_downsamples):
        if di <= d * (1 + MPP_TOLERANCE):
            level = i  # downsamples grow with the level
    read = max(1, int(round(tile * d / slide.level_downsamples[level])))
    return tile_grid(slide, mask, level, tile, min_tissue, read_size=read)


class TileDataset(torch.utils.data.Dataset):
    """The tiles of a :class:`TileGrid` as normalised float tensors [3, tile, tile] (ImageNet
    statistics), with their index (``indices[i]`` when given: a shard's global indices). A
    tile read at another size than the model's is resized (Lanczos, antialiased). The slide
    handle is opened lazily, once per worker process."""

    def __init__(self, path: str, grid: TileGrid, indices: Sequence[int] = ()):
        if not isinstance(grid, TileGrid):
            raise TypeError(f"grid must be a TileGrid, got {type(grid).__name__}")
        self.path, self.grid = path, grid
        self.indices = list(indices) or list(range(len(grid)))  # what __getitem__ reports
        if len(self.indices) != len(grid):
            raise ValueError(f"indices has {len(self.indices)} entries for {len(grid)} tiles")
        self._slide = None
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.grid)

    def read(self, i: int) -> np.ndarray:
        """Tile ``i`` as RGB uint8 [tile, tile, 3]."""
        from PIL import Image

        if self._slide is None:
            self._slide = open_slide(self.path)
        g = self.grid
        region = self._slide.read_region(g.coords[i], g.level, (g.read_size, g.read_size)).convert("RGB")
        if g.read_size != g.tile:
            region = region.resize((g.tile, g.tile), Image.LANCZOS)
        return np.asarray(region, dtype=np.uint8)

    def __getitem__(self, i: int):
        rgb = torch.from_numpy(self.read(i).copy())
        x = rgb.permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std, self.indices[i]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_slide"] = None  # a handle never crosses a process boundary
        return state
