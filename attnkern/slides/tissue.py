"""Tissue detection on a slide thumbnail, the way slideflow, TIAToolbox and CLAM do it:
HSV saturation, median-blurred, thresholded with Otsu's method (never below a minimum
saturation, so a blank slide has no tissue), small holes closed and tiny islands dropped.
scikit-image does the image work."""
from __future__ import annotations

import numpy as np

MIN_SATURATION = 15  # of 255: glass and dust stay below it (CLAM uses a fixed threshold of 8)


def tissue_mask(thumbnail: np.ndarray, min_saturation: int = MIN_SATURATION,
                min_island_fraction: float = 0.0005) -> np.ndarray:
    """Boolean [h, w] tissue mask of an RGB uint8 thumbnail [h, w, 3]."""
    from skimage.color import rgb2hsv
    from skimage.filters import median, threshold_otsu
    from skimage.morphology import disk, remove_small_holes, remove_small_objects

    if thumbnail.ndim != 3 or thumbnail.shape[2] < 3:
        raise ValueError(f"thumbnail must be [h, w, 3] RGB, got shape {thumbnail.shape}")
    sat = (rgb2hsv(thumbnail[..., :3])[..., 1] * 255).astype(np.uint8)
    sat = median(sat, disk(3))
    thr = min_saturation
    if sat.max() > sat.min():
        thr = max(float(threshold_otsu(sat)), min_saturation)
    mask = sat > thr
    area = max(1, int(min_island_fraction * mask.size))
    mask = remove_small_holes(mask, max_size=area)
    mask = remove_small_objects(mask, max_size=area)
    return mask
