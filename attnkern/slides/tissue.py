"""Tissue detection on a slide thumbnail, the way slideflow, TIAToolbox and CLAM do it:
HSV saturation thresholded with Otsu's method (never below a minimum saturation, so a blank
slide has no tissue), small holes closed and tiny islands dropped; scikit-image does the image
work.

Two guards keep dark non-tissue out (scanner borders, the near-black noise some scanners and
CZI conversions leave around the scanned area): the RGB channels are median-blurred before the
saturation is taken, so per-pixel noise on a grey or black area does not read as colour
(saturation is ``(max - min) / max``: on a dark pixel a few levels of noise make it large), and
a brightness floor drops every pixel whose brightest channel is below ``min_value`` (CLAM drops
tiles whose mean is below 50 in every channel). Stained tissue, even dark haematoxylin or DAB,
keeps at least one channel well above that floor.
"""
from __future__ import annotations

import numpy as np

MIN_SATURATION = 15  # of 255: glass and dust stay below it (CLAM uses a fixed threshold of 8)
MIN_VALUE = 50       # of 255: a pixel whose every channel is below this is black, not tissue


def tissue_mask(thumbnail: np.ndarray, min_saturation: int = MIN_SATURATION,
                min_island_fraction: float = 0.0005, min_value: int = MIN_VALUE) -> np.ndarray:
    """Boolean [h, w] tissue mask of an RGB uint8 thumbnail [h, w, 3] (a fourth, alpha,
    channel is ignored).

    A pixel is tissue when, after a median blur (disk of radius 3) of each channel, its HSV
    saturation is above Otsu's threshold of the saturation of the pixels that pass the
    brightness floor (and above ``min_saturation``), and its brightest channel is at least
    ``min_value``; then holes and islands smaller than ``min_island_fraction`` of the
    thumbnail are closed / dropped. Raises ValueError for a thumbnail that is not [h, w, 3+].
    """
    from skimage.filters import median, threshold_otsu
    from skimage.morphology import disk, remove_small_holes, remove_small_objects

    if thumbnail.ndim != 3 or thumbnail.shape[2] < 3:
        raise ValueError(f"thumbnail must be [h, w, 3] RGB, got shape {thumbnail.shape}")
    rgb = np.asarray(thumbnail[..., :3], dtype=np.uint8)
    footprint = disk(3)
    rgb = np.stack([median(rgb[..., c], footprint) for c in range(3)], axis=-1).astype(np.int32)
    value = rgb.max(axis=-1)
    chroma = value - rgb.min(axis=-1)
    sat = np.where(value > 0, chroma * 255 // np.maximum(value, 1), 0).astype(np.uint8)
    bright = value >= min_value
    thr = float(min_saturation)
    candidates = sat[bright]
    if candidates.size and candidates.max() > candidates.min():
        thr = max(float(threshold_otsu(candidates)), min_saturation)
    mask = (sat > thr) & bright
    area = max(1, int(min_island_fraction * mask.size))
    mask = remove_small_holes(mask, max_size=area)
    mask = remove_small_objects(mask, max_size=area)
    return mask
