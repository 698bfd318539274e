"""Per-tile attention stitched at thumbnail scale and blended over the thumbnail (as CLAM
does: a matplotlib colormap inside the tissue only, alpha 0.4), and the heatmap figure with a
colour bar and a title. matplotlib is imported only by the functions that draw."""
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


def colour_range(heat: np.ndarray, mask: np.ndarray) -> Tuple[float, float]:
    """The values that map to the two ends of the colour map: the 2nd and 98th percentiles of
    ``heat`` where ``mask`` is set and a tile was scored ((0, 1) when there is none)."""
    valid = mask & ~np.isnan(heat)
    if not valid.any():
        return 0.0, 1.0
    lo, hi = (float(q) for q in np.percentile(heat[valid], [2, 98]))
    return lo, hi


def overlay(thumbnail: np.ndarray, heat: np.ndarray, mask: np.ndarray, alpha: float = 0.4,
            cmap: str = "jet") -> np.ndarray:
    """RGB uint8: ``heat`` (normalised to :func:`colour_range`) coloured with ``cmap`` and
    alpha-blended over ``thumbnail`` where ``mask`` is set and a tile was scored."""
    from matplotlib import colormaps

    img = thumbnail[..., :3].astype(np.float32) / 255
    valid = mask & ~np.isnan(heat)
    if valid.any():
        lo, hi = colour_range(heat, mask)
        norm = np.clip((np.nan_to_num(heat, nan=lo) - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
        colour = colormaps[cmap](norm)[..., :3]
        img[valid] = (1 - alpha) * img[valid] + alpha * colour[valid]
    return (img * 255).round().astype(np.uint8)


def save_heatmap(path: str, thumbnail: np.ndarray, heat: np.ndarray, mask: np.ndarray, title: str,
                 label: str = "score", alpha: float = 0.4, cmap: str = "jet", dpi: int = 100) -> None:
    """Write the :func:`overlay` of ``heat`` on ``thumbnail`` as an image with ``title`` above
    and a colour bar (labelled ``label``) that maps colours to values over :func:`colour_range`
    (values beyond it take the end colours). The overlay keeps the thumbnail's pixels (one
    image pixel per thumbnail pixel)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    img = overlay(thumbnail, heat, mask, alpha=alpha, cmap=cmap)
    lo, hi = colour_range(heat, mask)
    h, w = img.shape[:2]
    bar_w, top = 1.3, 0.7  # inches beside and above the image
    fig = Figure(figsize=(w / dpi + bar_w, h / dpi + top), dpi=dpi)
    FigureCanvasAgg(fig)
    W, H = w / dpi + bar_w, h / dpi + top
    ax = fig.add_axes([0, 0, (w / dpi) / W, (h / dpi) / H])
    ax.imshow(img, interpolation="nearest")
    ax.set_axis_off()
    cax = fig.add_axes([(w / dpi + 0.15) / W, 0.1, 0.18 / W, 0.8 * (h / dpi) / H])
    pad = 0.0 if hi > lo else max(abs(lo), 1.0) * 1e-3  # a constant map: every tile the low colour
    sm = ScalarMappable(norm=Normalize(vmin=lo, vmax=hi + 2 * pad), cmap=cmap)
    bar = fig.colorbar(sm, cax=cax, label=label)
    bar.formatter.set_useOffset(False)
    bar.update_ticks()
    fig.suptitle(title, fontsize=9, y=1 - 0.08 / H, va="top")
    fig.savefig(path, dpi=dpi)
