"""Tiles over the tissue of a slide, and a Dataset that reads them (each DataLoader worker
opens its own slide handle)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch

from .reader import SlideError, open_slide

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def tile_grid(slide, mask: np.ndarray, level: int, tile: int, min_tissue: float = 0.25) -> List[Tuple[int, int]]:
    """Level-0 (x, y) of every ``tile`` x ``tile`` tile at ``level`` whose area is at least
    ``min_tissue`` tissue according to ``mask`` (a thumbnail-scale boolean mask)."""
    if not 0 <= level < slide.level_count:
        raise SlideError(f"level {level} does not exist: the slide has levels 0..{slide.level_count - 1}")
    W, H = slide.level_dimensions[level]
    if tile > W or tile > H:
        raise SlideError(f"tile {tile} px is larger than level {level} ({W} x {H} px)")
    d = slide.level_downsamples[level]
    W0, H0 = slide.dimensions
    mh, mw = mask.shape
    sy, sx = mh / H0, mw / W0
    coords = []
    step0 = tile * d
    for ty in range(H // tile):
        for tx in range(W // tile):
            x0, y0 = tx * step0, ty * step0
            m = mask[int(y0 * sy):max(int(y0 * sy) + 1, int((y0 + step0) * sy)),
                     int(x0 * sx):max(int(x0 * sx) + 1, int((x0 + step0) * sx))]
            if m.size and m.mean() >= min_tissue:
                coords.append((int(round(x0)), int(round(y0))))
    return coords


class TileDataset(torch.utils.data.Dataset):
    """RGB tiles as normalised float tensors [3, tile, tile] (ImageNet statistics), with their
    index (``indices[i]`` when given: a shard's global indices). The slide handle is opened
    lazily, once per worker process."""

    def __init__(self, path: str, coords: Sequence[Tuple[int, int]], level: int, tile: int,
                 indices: Sequence[int] = ()):
        self.path, self.coords, self.level, self.tile = path, list(coords), level, tile
        self.indices = list(indices) or list(range(len(self.coords)))  # what __getitem__ reports
        self._slide = None
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int):
        if self._slide is None:
            self._slide = open_slide(self.path)
        region = self._slide.read_region(self.coords[i], self.level, (self.tile, self.tile))
        rgb = torch.from_numpy(np.asarray(region.convert("RGB"), dtype=np.uint8).copy())
        x = rgb.permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std, self.indices[i]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_slide"] = None  # a handle never crosses a process boundary
        return state
