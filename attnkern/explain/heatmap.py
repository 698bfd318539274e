"""Per-tile attention stitched at thumbnail scale and blended over the thumbnail (as CLAM
does: a matplotlib colormap inside the tissue only, alpha 0.4)."""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def stitch(maps: Sequence[np.ndarray], coords: Sequence[Tuple[int, int]], tile0: float,
           slide_size: Tuple[int, int], thumb_shape: Tuple[int, int]) -> np.ndarray:
    """A float [h, w] map at thumbnail scale (NaN where no tile): tile i covers level-0
    ``(x, y)`` to ``(x + tile0, y + tile0)``; its map (any [mh, mw] array) is resized onto it."""
    h, w = thumb_shape
    W0, H0 = slide_size
    out = np.full((h, w), np.nan, np.float32)
    for m, (x, y) in zip(maps, coords):
        x0, y0 = int(x * w / W0), int(y * h / H0)
        x1, y1 = max(x0 + 1, int((x + tile0) * w / W0)), max(y0 + 1, int((y + tile0) * h / H0))
        x1, y1 = min(x1, w), min(y1, h)
        if x1 <= x0 or y1 <= y0:
            continue
        t = torch.as_tensor(np.asarray(m, np.float32))[None, None]
        out[y0:y1, x0:x1] = F.interpolate(t, size=(y1 - y0, x1 - x0), mode="bilinear",
                                          align_corners=False)[0, 0].numpy()
    return out


def overlay(thumbnail: np.ndarray, heat: np.ndarray, mask: np.ndarray, alpha: float = 0.4,
            cmap: str = "jet") -> np.ndarray:
    """RGB uint8: ``heat`` (normalised between its 2nd and 98th percentiles) coloured with
    ``cmap`` and alpha-blended over ``thumbnail`` where ``mask`` is set and a tile was scored."""
    from matplotlib import colormaps

    img = thumbnail[..., :3].astype(np.float32) / 255
    valid = mask & ~np.isnan(heat)
    if valid.any():
        v = heat[valid]
        lo, hi = (float(q) for q in np.percentile(v, [2, 98]))
        norm = np.clip((np.nan_to_num(heat, nan=lo) - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
        colour = colormaps[cmap](norm)[..., :3]
        img[valid] = (1 - alpha) * img[valid] + alpha * colour[valid]
    return (img * 255).round().astype(np.uint8)
