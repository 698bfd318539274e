"""``attnkern profile --sample K``: hard attention over a slide by attention sampling
(Katharopoulos and Fleuret, ICML 2019).

1. Attention from a coarse view: the model runs on tiles of a coarse level (the finest level
   at least ``COARSE_FACTOR`` times coarser than the working resolution that holds a tile), its
   class activation maps of the positive class (:mod:`attnkern.explain.cam`, computed in that
   forward) are stitched over the slide, and each working-level tile gets the mean of the map
   over its footprint; the attention over the tiles is the softmax of those scores.
2. K tiles are drawn at the working level from that distribution without replacement
   (:func:`attnkern.explain.attention_sample`, Gumbel top-k, seeded).
3. The model runs on those K tiles only; the slide-level prediction is the estimator of the
   paper, ``sum_k w_k p(tile q_k)``, an unbiased estimate of the attention-weighted mean of
   the tiles' class probabilities, ``sum_i a_i p(tile i)``, which the exhaustive run gives
   exactly: the report puts the two side by side, with the distance between them.

The population is the tiles the exhaustive run profiled (all tissue tiles when
``--max-tiles`` is at least their number), so both predictions are of the same quantity.
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from .reader import SlideError
from .tiling import TileDataset, TileGrid, tile_grid

COARSE_FACTOR = 8


def coarse_level(slide, grid: TileGrid) -> int:
    """The finest level at least COARSE_FACTOR times coarser than ``grid``'s working resolution
    (its level's downsample times read size / model tile size, so a resized ``--mpp`` grid
    counts at the resolution the model sees) that holds a ``grid.tile`` px tile; else the
    coarsest level coarser than ``grid.level`` that holds one."""
    level, tile = grid.level, grid.tile
    d0 = grid.downsample * grid.read_size / grid.tile
    fits = [L for L in range(level + 1, slide.level_count) if min(slide.level_dimensions[L]) >= tile]
    if not fits:
        raise SlideError(f"--sample needs a level coarser than level {level} that holds a {tile} px tile; "
                         f"the slide has levels {[tuple(d) for d in slide.level_dimensions]}")
    far = [L for L in fits if slide.level_downsamples[L] >= COARSE_FACTOR * d0 * 0.99]
    return far[0] if far else fits[-1]


def tile_attention(heat: np.ndarray, coords: Sequence[Tuple[int, int]], size0: float,
                   slide_size: Tuple[int, int]) -> np.ndarray:
    """Softmax over the tiles of the mean of ``heat`` (a thumbnail-scale map, NaN where the
    coarse view has no tile) over each tile's footprint; a tile with no covered pixel takes
    the lowest covered score. float64 [N], sums to 1."""
    h, w = heat.shape
    W0, H0 = slide_size
    scores = np.full(len(coords), np.nan)
    for n, (x, y) in enumerate(coords):
        x0, y0 = int(x * w / W0), int(y * h / H0)
        x1, y1 = max(x0 + 1, int((x + size0) * w / W0)), max(y0 + 1, int((y + size0) * h / H0))
        v = heat[y0:min(y1, h), x0:min(x1, w)]
        if v.size and not np.isnan(v).all():
            scores[n] = np.nanmean(v)
    if np.isnan(scores).all():
        raise SlideError("--sample: the coarse view covers none of the profiled tiles")
    scores = np.where(np.isnan(scores), np.nanmin(scores), scores)
    e = np.exp(scores - scores.max())
    return e / e.sum()


def _probabilities(model, loader, device, amp, channels_last) -> Dict[int, np.ndarray]:
    ctx = (torch.autocast(device.split(":")[0], dtype=amp) if amp is not None else contextlib.nullcontext())
    out = {}
    with torch.inference_mode(), ctx:
        for x, idx in loader:
            x = x.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            p = model(x).float().softmax(1).cpu().numpy()
            for j, i in enumerate(idx.tolist()):
                out[i] = p[j]
    return out


def sampled_run(model, slide, path: str, mask: np.ndarray, grid: TileGrid, k: int, exhaustive: Dict,
                exhaustive_preds: Dict[int, List[float]], tissue_tiles: int, batch: int, device: str,
                num_classes: int, seed: int = 0, amp=None, channels_last: bool = False, variant: str = "") -> Dict:
    """The sampled run (see the module docstring) with ``model`` (eager, eval) over the tiles
    of ``grid`` (a :class:`TileGrid`: level-0 coordinates with the level they are read at and
    the read and model sizes) that the exhaustive run profiled, whose figures and per-tile
    probabilities (keyed by index into ``grid``) are ``exhaustive`` / ``exhaustive_preds``.
    Returns the figures for the report: tiles read, tiles/s, seconds per slide for both runs,
    the two slide-level predictions and their distance (L1 and largest absolute difference
    of the class probabilities)."""
    from ..explain.cam import CamRecorder
    from ..explain.heatmap import stitch
    from ..explain.sampling import attention_sample
    from .explain_tiles import positive_class

    if not isinstance(grid, TileGrid):
        raise TypeError(f"grid must be a TileGrid, got {type(grid).__name__}")
    n, tile = len(grid), grid.tile
    if not 1 <= k <= n:
        raise SlideError(f"--sample {k}: must be between 1 and the {n} profiled tiles (raise --max-tiles)")
    target = positive_class(num_classes)
    try:
        rec = CamRecorder(model)
    except ValueError as e:
        raise SlideError(f"--sample needs a CNN whose head is global average pooling + linear (its CAM is the "
                         f"coarse attention): {e}") from None
    Lc = coarse_level(slide, grid)
    dl = lambda ds: torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=0)  # noqa: E731
    with torch.inference_mode():  # warm-up outside the timing, as the exhaustive run's
        model(torch.zeros(1, 3, tile, tile, device=device))
    t_start = time.perf_counter()
    # 1. attention from the coarse view, its CAM computed in the same forward
    coarse = tile_grid(slide, mask, Lc, tile, min_tissue=0.1)
    if not coarse:
        raise SlideError(f"--sample: no tissue tile at the coarse level {Lc}")
    maps = {}
    ctx = torch.autocast(device.split(":")[0], dtype=amp) if amp is not None else contextlib.nullcontext()
    with rec, torch.inference_mode(), ctx:
        for x, idx in dl(TileDataset(path, coarse)):
            x = x.to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            m, _ = rec.maps(model(x), target)
            for j, i in enumerate(idx.tolist()):
                maps[i] = m[j].float().cpu().numpy()
    rec.close()
    heat = stitch([maps[i] for i in range(len(coarse))], coarse.coords, coarse.size0, slide.dimensions, mask.shape)
    a = tile_attention(heat, grid.coords, grid.size0, slide.dimensions)
    t_coarse = time.perf_counter() - t_start
    # 2. K tiles drawn without replacement; 3. the model on those only, the estimator
    draw = attention_sample(torch.from_numpy(a), k, seed=seed)
    picked = draw.indices.tolist()
    probs = _probabilities(model, dl(TileDataset(path, grid.subset(picked), indices=picked)), device, amp,
                           channels_last)
    estimate = (draw.weights.numpy()[:, None] * np.stack([probs[i] for i in picked])).sum(0)
    seconds = time.perf_counter() - t_start
    full = (a[:, None] * np.stack([np.asarray(exhaustive_preds[i], np.float64) for i in range(n)])).sum(0)
    tiles_read = len(coarse) + k
    ex_rate = exhaustive["tiles"] / exhaustive["seconds"] if exhaustive.get("seconds") else 0.0
    return dict(
        k=k, seed=seed, variant=variant, coarse_level=Lc, coarse_downsample=float(slide.level_downsamples[Lc]),
        target_class=target, population=n,
        sampled=dict(tiles_read=tiles_read, coarse_tiles=len(coarse), working_tiles=k, seconds=seconds,
                     coarse_seconds=t_coarse, tiles_per_s=tiles_read / seconds if seconds else 0.0,
                     seconds_per_slide=seconds, prediction=estimate.tolist(), tiles=picked,
                     weights=draw.weights.tolist()),
        exhaustive=dict(tiles_read=exhaustive["tiles"], seconds=exhaustive["seconds"], tiles_per_s=ex_rate,
                        seconds_per_slide=tissue_tiles / ex_rate if ex_rate else None, tissue_tiles=tissue_tiles,
                        prediction=full.tolist()),
        distance=dict(l1=float(np.abs(estimate - full).sum()), max_abs=float(np.abs(estimate - full).max()),
                      same_class=bool(int(np.argmax(estimate)) == int(np.argmax(full)))),
    )


def sampled_eager_variant(base: torch.nn.Module, results: Dict) -> Tuple[str, torch.nn.Module]:
    """The exhaustive variant the sampled run is set beside (fused if it was profiled, else
    naive, else a compiled one) and the eager model that computes it."""
    import copy

    import attnkern

    for v in ("fused", "naive", "fused-compile", "compile"):
        if v in results:
            return v, (attnkern.convert(copy.deepcopy(base)).eval() if v.startswith("fused") else base)
    raise SlideError("--sample needs an exhaustive run to compare with")


def markdown_lines(report: Dict) -> List[str]:
    s = report.get("sampled")
    if not s:
        return []
    a, e, d = s["sampled"], s["exhaustive"], s["distance"]
    fmt = lambda p: "[" + ", ".join(f"{v:.4f}" for v in p) + "]"  # noqa: E731
    per_slide = f"{e['seconds_per_slide']:.2f}" if e["seconds_per_slide"] is not None else "-"
    return ["", f"Attention sampling (`--sample {s['k']}`, seed {s['seed']}, {s['variant']} model; attention from the "
                f"CAM of class {s['target_class']} at level {s['coarse_level']}, downsample {s['coarse_downsample']:g}; "
                f"population: the {s['population']} profiled tiles):", "",
            "| run | tiles read | tiles/s | seconds | seconds per slide | slide-level prediction |",
            "|---|---|---|---|---|---|",
            f"| exhaustive | {e['tiles_read']} | {e['tiles_per_s']:.2f} | {e['seconds']:.2f} | {per_slide} "
            f"({e['tissue_tiles']} tissue tiles) | {fmt(e['prediction'])} |",
            f"| sampled | {a['tiles_read']} ({a['coarse_tiles']} coarse + {a['working_tiles']}) | {a['tiles_per_s']:.2f} | "
            f"{a['seconds']:.2f} | {a['seconds_per_slide']:.2f} | {fmt(a['prediction'])} |",
            "", f"Sampled vs exhaustive slide-level prediction: L1 {d['l1']:.4f}, largest difference {d['max_abs']:.4f}, "
                f"same class: {'yes' if d['same_class'] else 'no'}"]
