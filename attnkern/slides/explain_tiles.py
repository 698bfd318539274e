"""Post-hoc explanations in ``attnkern profile``: ``--explain cam`` (class activation maps of
every profiled tile, computed inside the timed forward pass; the heatmap stitches them) and
``--explain guided-gradcam`` (Guided Grad-CAM of the top-scoring tiles, written as a gallery
image next to the slide heatmap)."""
from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .reader import SlideError
from .tiling import TileGrid

from .models import EXPLAIN  # noqa: F401  (the --explain choices live with the models)

GALLERY_TILES = 8     # tiles in the guided Grad-CAM gallery
GALLERY_PX = 160      # side of each panel in the gallery, pixels


def positive_class(num_classes: int) -> int:
    """The class the slide maps show: class 1 (class 0 for a one-class model)."""
    return min(1, num_classes - 1)


class CamPass(nn.Module):
    """``model`` whose forward also computes the class activation maps of ``target`` for every
    image (:class:`attnkern.explain.cam.CamRecorder`: a hook keeps the last feature maps, the
    classifier's weights are applied to them) and copies them to the host. What this adds to
    the forward is timed on its own (after a CUDA synchronisation on a GPU, so the forward's
    own time is not counted in it)."""

    def __init__(self, model: nn.Module, target: int):
        super().__init__()
        from ..explain.cam import CamRecorder

        self.model = model
        try:
            self.rec = CamRecorder(model).attach()
        except ValueError as e:
            raise SlideError(f"--explain cam: {e}") from None
        self.target = target
        self.batches: List[Tuple[np.ndarray, float]] = []

    def forward(self, x):
        logits = self.model(x)
        if logits.is_cuda:
            torch.cuda.synchronize(logits.device)
        t0 = time.perf_counter()
        try:
            maps, _ = self.rec.maps(logits, self.target)
        except ValueError as e:
            raise SlideError(f"--explain cam: {e}") from None
        m = maps.float().cpu().numpy()
        self.batches.append((m, time.perf_counter() - t0))
        return logits

    def finish(self, indices: Sequence[int], fig: Dict) -> Dict[int, np.ndarray]:
        """Remove the hooks; return the maps of the timed pass (the last ``len(indices)`` tiles
        seen: warm-up batches come first) keyed by tile index, and add to ``fig`` the seconds
        spent on CAM in the timed pass and their share of its compute time."""
        self.rec.close()
        n, maps, seconds = len(indices), [], 0.0
        for m, s in reversed(self.batches):
            if sum(len(x) for x in maps) >= n:
                break
            maps.insert(0, m)
            seconds += s
        flat = np.concatenate(maps)[-n:] if maps else np.zeros((0, 1, 1), np.float32)
        fig.update(cam_seconds=seconds, cam_share=seconds / fig["compute_seconds"] if fig.get("compute_seconds") else 0.0)
        self.batches = []
        return {i: flat[j] for j, i in enumerate(indices)}


def cam_info(model: nn.Module, target: int) -> Dict:
    from ..explain.cam import find_gap_linear_head

    layer, pool, fc = find_gap_linear_head(getattr(model, "_orig_mod", model))
    return dict(target_class=target, layer=layer, pooling=pool, classifier=fc)


def _panel(rgb: np.ndarray) -> "object":
    from PIL import Image

    return Image.fromarray(rgb).resize((GALLERY_PX, GALLERY_PX), Image.BILINEAR)


def write_gallery(model: nn.Module, path: str, grid: TileGrid, preds: Dict[int, List[float]], out_dir: str,
                  device: str, num_classes: int) -> Dict:
    """Guided Grad-CAM (:func:`attnkern.explain.guided_gradcam`) of the ``GALLERY_TILES`` profiled
    tiles (``grid``, a :class:`~attnkern.slides.tiling.TileGrid`; ``preds`` keyed by index into
    it) with the highest predicted probability of the positive class, for that class, written
    as ``gallery.png`` in ``out_dir``: one row per tile (the tile, Grad-CAM over it, Guided
    Backpropagation, Guided Grad-CAM). Returns what the report records (tiles, scores, seconds)."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    from ..explain.guided import check_guided_support, guided_gradcam, to_image
    from .tiling import IMAGENET_MEAN, IMAGENET_STD, TileDataset

    if not isinstance(grid, TileGrid):
        raise TypeError(f"grid must be a TileGrid, got {type(grid).__name__}")

    t0 = time.perf_counter()
    target = positive_class(num_classes)
    try:
        check_guided_support(model, "--explain guided-gradcam")
    except ValueError as e:
        raise SlideError(str(e)) from None
    top = sorted(preds, key=lambda i: -preds[i][target])[:GALLERY_TILES]
    ds = TileDataset(path, grid.subset(top), indices=top)
    coords = grid.coords
    x = torch.stack([ds[j][0] for j in range(len(top))])
    dev = next(model.parameters()).device
    r = guided_gradcam(model, x.to(dev), target=target)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    head = 18
    sheet = Image.new("RGB", (4 * GALLERY_PX, len(top) * (GALLERY_PX + head) + head), "white")
    draw = ImageDraw.Draw(sheet)
    for c, title in enumerate(("tile", f"Grad-CAM class {target}", "guided backprop", "guided Grad-CAM")):
        draw.text((c * GALLERY_PX + 4, 3), title, fill="black")
    jet = colormaps["jet"]
    tiles = []
    for j, i in enumerate(top):
        rgb = ((x[j] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        g = r.gradcam[j].float().cpu().numpy()
        cam_rgb = ((0.6 * rgb / 255 + 0.4 * jet(g)[..., :3]) * 255).round().astype(np.uint8)
        y = head + j * (GALLERY_PX + head)
        draw.text((4, y + 3), f"tile {i} at level-0 ({coords[i][0]}, {coords[i][1]}): "
                              f"p(class {target}) = {preds[i][target]:.3f}", fill="black")
        for c, img in enumerate((rgb, cam_rgb, to_image(r.guided[j]).numpy(), to_image(r.guided_gradcam[j]).numpy())):
            sheet.paste(_panel(img), (c * GALLERY_PX, y + head))
        tiles.append(dict(index=int(i), x=int(coords[i][0]), y=int(coords[i][1]), score=float(preds[i][target])))
    sheet.save(os.path.join(out_dir, "gallery.png"))
    return dict(file="gallery.png", target_class=target, level=grid.level, tiles=tiles,
                seconds=time.perf_counter() - t0)


def markdown_lines(report: Dict) -> List[str]:
    """Lines the report adds for ``--explain cam`` / ``guided-gradcam`` and ``--sample``."""
    lines: List[str] = []
    cams = {v: f for v, f in report.get("variants", {}).items() if "cam_seconds" in f}
    if cams:
        lines += ["", "CAM of class {} inside the timed forward (layer `{}`): ".format(
            report.get("cam", {}).get("target_class", "?"), report.get("cam", {}).get("layer", "?")) + "; ".join(
            f"{v} {f['cam_seconds']:.3f} s of {f['compute_seconds']:.2f} s compute ({f['cam_share']:.1%})"
            for v, f in cams.items())]
    if report.get("gallery"):
        g = report["gallery"]
        lines += ["", f"Guided Grad-CAM of the {len(g['tiles'])} top-scoring tiles: `{g['file']}` ({g['seconds']:.1f} s)"]
    from .sampled import markdown_lines as sampled_lines

    return lines + sampled_lines(report)
