"""``attnkern profile``: throughput of a model over the tissue of a slide, with attnkern's kernels
("fused": the model after :func:`attnkern.convert`), without them ("naive": the model as timm
builds it), with ``torch.compile`` of it ("compile") and of the converted model
("fused-compile"); reading and compute time apart; and a heatmap of where the model looks.

Tiles are chosen by pyramid level (``--level``) or by resolution (``--mpp``,
``--magnification``: read at the nearest finer level and resized). The job runs in three
steps, each a function: :func:`choose_tiles` (tissue mask and the tile grid),
:func:`run_variant` for each timed pass, :func:`score_tiles` (one pass of the fused model over
the heatmap's tiles: a map and class probabilities per tile) and :func:`write_outputs`.

Outputs in ``--out`` (:data:`OUTPUT_FILES`): ``report.json`` (every figure, the machine,
versions, arguments, the files written; marked ``partial`` if the run was interrupted),
``report.md`` (the side-by-side table), ``heatmap.png`` (the per-tile maps stitched over the
thumbnail, with a colour bar and a title), ``heatmap.npy`` (the stitched map itself),
``tiles.csv`` and ``tiles.geojson`` (every scored tile: level-0 position and size, score,
class probabilities; the GeoJSON imports into QuPath), ``mask.png`` (the tissue), and with
``--explain guided-gradcam`` ``gallery.png`` (:func:`~attnkern.slides.explain_tiles.write_gallery`).

``--explain cam`` computes the class activation map of every profiled tile inside the timed
forward (:class:`~attnkern.slides.explain_tiles.CamPass`) and stitches those instead of
running a heatmap pass; ``--sample K`` adds a hard-attention run beside the exhaustive one
(:mod:`attnkern.slides.sampled`).
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import functools
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from .. import _cpu
from . import dist as D
from .allocator import POLICIES as ALLOCATOR_POLICIES
from .allocator import apply as apply_allocator_policy
from .explain_tiles import CamPass, cam_info, markdown_lines, positive_class, write_gallery
from .reader import SlideError, open_slide
from .sample import sample_slide_path
from .models import EXPLAIN, MODELS, VARIANTS
from .tiling import TileDataset, TileGrid, resolution_grid, tile_grid
from .tissue import tissue_mask

THUMB = 1024


@dataclass
class ProfileArgs:
    slide: Optional[str] = None
    model: str = "cbam_resnet50"
    checkpoint: Optional[str] = None
    tile: int = 256
    level: int = 0
    mpp: Optional[float] = None           # tiles at this many microns per pixel (instead of level)
    magnification: Optional[float] = None  # or at this magnification (20 = 20x)
    batch: int = 16
    workers: int = 1
    compare: List[str] = field(default_factory=lambda: ["naive", "compile", "fused", "fused-compile"])
    out: str = "results/profile"
    max_tiles: int = 64
    device: str = "cpu"
    num_classes: int = 2
    progress: bool = True
    train: bool = False
    explain: str = "attention"
    amp: str = "auto"                     # auto (bf16 on CUDA, off on CPU), bf16, fp16, off
    channels_last: Optional[bool] = None  # None: yes (the faster layout on CPU and GPU alike)
    trace: bool = False                   # a torch.profiler trace of each variant's pass
    sample: int = 0                       # --sample K: attention sampling of K tiles (0: off)
    sample_seed: int = 0
    allocator: str = "auto"               # the allocator policy (slides/allocator.py): auto or off


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def amp_dtype(args: ProfileArgs, device: str) -> Optional[torch.dtype]:
    """The autocast dtype of the timed passes: ``auto`` is bfloat16 on CUDA, none on CPU."""
    if args.amp == "auto":
        return torch.bfloat16 if device.startswith("cuda") else None
    return AMP_DTYPES[args.amp]


def use_channels_last(args: ProfileArgs, device: str) -> bool:
    """channels_last unless asked otherwise: on CPU it is also the faster layout for every
    variant (oneDNN's convolutions; benchmarks/test_bench_models.py), as on CUDA."""
    return True if args.channels_last is None else bool(args.channels_last)


def build_model(name: str, num_classes: int, checkpoint: Optional[str]) -> torch.nn.Module:
    """A timm model with random weights (or ``checkpoint``'s), in eval mode."""
    import timm

    if name not in MODELS:
        raise SlideError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    arch, kwargs = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)
    if checkpoint:
        if not os.path.exists(checkpoint):
            raise SlideError(f"no such checkpoint: {checkpoint}")
        sd = torch.load(checkpoint, map_location="cpu", weights_only=True)
        sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
        model.load_state_dict(sd, strict=True)
    return model.eval()


def _variant(base: torch.nn.Module, variant: str) -> torch.nn.Module:
    import attnkern

    if variant == "naive":
        return base
    if variant == "compile":
        return torch.compile(base)
    if variant in ("fused", "fused-compile"):
        model = attnkern.convert(copy.deepcopy(base))
        return model if variant == "fused" else torch.compile(model)
    raise SlideError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2 ** 20


def _cpu_kernels() -> Optional[str]:
    """The vector ISA of the C++ kernels' copy that runs (DEFAULT, AVX2, AVX512,
    AVX512_BF16), or None."""
    return _cpu.cpu_capability() if _cpu.extension() is not None else None


def _machine() -> Dict:
    return dict(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                cpu=_cpu.cpu_model(), cpu_kernels=_cpu_kernels(), threads=torch.get_num_threads(),
                cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None)


def run_variant(model, loader, device: str, progress: bool, label: str, train: bool = False,
                amp: Optional[torch.dtype] = None, channels_last: bool = False,
                trace: Optional[str] = None):
    """Time one pass over the tiles: inference, or with ``train`` a training step per batch
    (forward, cross-entropy on fixed pseudo-labels, backward, SGD), under autocast to ``amp``
    if given, with channels_last inputs if asked. On CUDA the compute time is measured with
    CUDA events around each step (the reading time with the host clock); ``trace`` writes a
    torch.profiler (Chrome) trace of the pass to that path. Returns (figures, predictions)."""
    from tqdm import tqdm

    cuda = device.startswith("cuda")

    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) if train else None
    model.train(train)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    def autocast():
        return torch.autocast(device.split(":")[0], dtype=amp) if amp is not None else contextlib.nullcontext()

    def step(x, idx):
        if not train:
            with torch.inference_mode(), autocast():
                return model(x)
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float(), (idx % logits.shape[1]).to(x.device))
        loss.backward()
        opt.step()
        return logits.detach()

    def to_device(x):
        x = x.to(device, non_blocking=cuda)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    x0, i0 = next(iter(loader))
    step(to_device(x0), i0)  # warm-up (and compilation) outside the timed pass
    # The last batch is smaller when the tiles do not divide into batches: warm that size up too,
    # or torch.compile would compile its graph again (for a new batch size) inside the timed pass.
    rest = len(loader.dataset) % (loader.batch_size or 1)
    if rest and len(loader.dataset) > rest:
        step(to_device(x0[:rest]), i0[:rest])
    prof = None
    if trace:
        from torch.profiler import ProfilerActivity, profile as _prof

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        prof = _prof(activities=acts, record_shapes=True)
        prof.__enter__()
    events = []
    preds = {}
    read_s = compute_s = 0.0
    peak = _rss_mb()
    n = 0
    bar = tqdm(total=len(loader.dataset), desc=f"{label:>8}", unit="tile", disable=not progress, leave=True)
    t_start = time.perf_counter()
    t0 = t_start
    for x, idx in loader:
        t1 = time.perf_counter()
        read_s += t1 - t0
        x = to_device(x)
        if cuda:
            ev = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            ev[0].record()
        logits = step(x, idx)
        if cuda:
            ev[1].record()
            events.append(ev)
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        compute_s += t0 - t1
        p = logits.float().softmax(dim=1)
        for j, i in enumerate(idx.tolist()):
            preds[i] = p[j].tolist()
        n += len(idx)
        peak = max(peak, _rss_mb())
        bar.set_postfix(tiles_per_s=f"{n / max(1e-9, t0 - t_start):.1f}")
        bar.update(len(idx))
    bar.close()
    total = time.perf_counter() - t_start
    if prof is not None:
        prof.__exit__(None, None, None)
        prof.export_chrome_trace(trace)
    fig = dict(tiles=n, seconds=total, read_seconds=read_s, compute_seconds=compute_s,
               tiles_per_s=n / total if total else 0.0, peak_rss_mb=peak,
               amp=str(amp).replace("torch.", "") if amp is not None else "off", channels_last=channels_last)
    if cuda:  # GPU time of the steps from CUDA events; peak GPU memory of the pass
        compute_s = sum(a.elapsed_time(b) for a, b in events) / 1e3
        fig.update(compute_seconds=compute_s, gpu_peak_mb=torch.cuda.max_memory_allocated(device) / 2**20)
    fig["bound"] = "read" if read_s > compute_s else "compute"
    return fig, preds


def profile(args: ProfileArgs) -> Dict:
    """Run the job and write its outputs (rank 0 under torchrun); returns the report."""
    for v in args.compare:
        if v not in VARIANTS:
            raise SlideError(f"unknown variant {v!r} in --compare; known: {', '.join(VARIANTS)}")
    if args.tile < 16 or args.batch < 1 or args.max_tiles < 1 or args.workers < 0:
        raise SlideError("--tile must be >= 16, --batch and --max-tiles >= 1, --workers >= 0")
    if args.model not in MODELS:
        raise SlideError(f"unknown model {args.model!r}; known: {', '.join(MODELS)}")
    if args.amp not in ("auto", *AMP_DTYPES):
        raise SlideError(f"unknown --amp {args.amp!r}; known: auto, {', '.join(AMP_DTYPES)}")
    if args.explain not in EXPLAIN:
        raise SlideError(f"unknown --explain {args.explain!r}; known: {', '.join(EXPLAIN)}")
    if args.mpp is not None and args.magnification is not None:
        raise SlideError("give --mpp or --magnification, not both")
    if args.sample < 0:
        raise SlideError(f"--sample must be >= 0 (0: off), got {args.sample}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SlideError("--device cuda asked for, but no CUDA device is available")
    if args.allocator not in ALLOCATOR_POLICIES:
        raise SlideError(f"unknown --allocator {args.allocator!r}; known: {', '.join(ALLOCATOR_POLICIES)}")
    allocator = apply_allocator_policy(args.allocator)  # before the first big allocation
    rank, world, device, started = D.setup(args.device)
    try:
        return _profile(args, rank, world, device, allocator)
    finally:
        if started:
            torch.distributed.destroy_process_group()


def choose_tiles(slide, path: str, args: ProfileArgs):
    """The thumbnail, its tissue mask and the grid of tissue tiles the timed passes read:
    at ``args.level``, or at ``args.mpp`` / ``args.magnification`` (nearest finer level,
    resized). Raises :class:`SlideError` when there is no tissue or no tissue tile."""
    thumb = np.asarray(slide.get_thumbnail((THUMB, THUMB)).convert("RGB"))
    mask = tissue_mask(thumb)
    if not mask.any():
        raise SlideError(f"no tissue found in {path}")
    if args.mpp is not None or args.magnification is not None:
        grid = resolution_grid(slide, mask, args.tile, mpp=args.mpp, magnification=args.magnification)
        where = f"{grid.mpp:.3g} um/px (level {grid.level}, {grid.read_size} px read)"
    else:
        grid = tile_grid(slide, mask, args.level, args.tile)
        where = f"level {args.level}"
    if not len(grid):
        raise SlideError(f"no {args.tile} px tile at {where} is mostly tissue in {path}")
    return thumb, mask, grid


def _spread(grid: TileGrid, n: int) -> TileGrid:
    """At most ``n`` tiles spread evenly over the grid (deterministic)."""
    if len(grid) <= n:
        return grid
    return grid.subset(np.linspace(0, len(grid) - 1, n).round().astype(int).tolist())


def _profile(args: ProfileArgs, rank: int, world: int, device: str, allocator: str) -> Dict:
    lead = rank == 0
    path = args.slide or (sample_slide_path() if lead else None)
    if world > 1:
        path = D.gather(path, world)[0]  # rank 0 creates the sample once
    slide = open_slide(path)
    thumb, mask, all_tiles = choose_tiles(slide, path, args)
    grid = _spread(all_tiles, args.max_tiles)
    files: List[Dict[str, str]] = []
    if lead:
        os.makedirs(args.out, exist_ok=True)
        _save_mask(args.out, mask, files)

    report = dict(partial=True, started=_dt.datetime.now().isoformat(timespec="seconds"),
                  slide=dict(path=os.path.abspath(path), dimensions=slide.dimensions,
                             levels=slide.level_count, mpp=slide.properties.get("openslide.mpp-x"),
                             tissue_fraction=float(mask.mean()), tissue_tiles=len(all_tiles),
                             profiled_tiles=len(grid)),
                  tiles=dict(grid.describe(), effective_mpp=grid.mpp),
                  args=asdict(args), machine=dict(_machine(), allocator=allocator), world_size=world,
                  variants={}, files=files)
    mpix = args.tile * args.tile / 1e6
    base = build_model(args.model, args.num_classes, args.checkpoint).to(device)
    cl, amp = use_channels_last(args, device), amp_dtype(args, device)
    if cl:
        base = base.to(memory_format=torch.channels_last)

    def trace_path(v):
        if not (args.trace and lead):
            return None
        name = f"trace-{v.replace(' ', '-')}.json"
        files.append(dict(file=name, what=f"torch.profiler trace of the {v} pass"))
        return os.path.join(args.out, name)

    mine = D.shard(len(grid), rank, world)
    loader = torch.utils.data.DataLoader(
        TileDataset(path, grid.subset(mine), indices=mine),
        batch_size=args.batch, shuffle=False,
        num_workers=args.workers, pin_memory=device.startswith("cuda"),
        persistent_workers=False, prefetch_factor=4 if args.workers else None)
    results = {}
    try:
        progress = args.progress and lead
        cam_maps, cam_variant = None, None
        for v in args.compare:
            model = _variant(base, v)
            cam_pass = CamPass(model, positive_class(args.num_classes)) if args.explain == "cam" else None
            fig, preds = run_variant(cam_pass or model, loader, device, progress, v, amp=amp, channels_last=cl,
                                     trace=trace_path(v))
            if cam_pass is not None:  # CAM of every profiled tile, computed in the timed forward
                maps_v = cam_pass.finish(mine, fig)
                if cam_maps is None:  # the heatmap's maps: the first variant's
                    cam_maps, cam_variant = {i: m for part in D.gather(maps_v, world) for i, m in part.items()}, v
            fig = D.merge_figures(D.gather(fig, world))
            preds = {i: p for part in D.gather(preds, world) for i, p in part.items()}
            fig["megapixels_per_s"] = fig["tiles_per_s"] * mpix
            results[v] = (fig, preds)
            report["variants"][v] = fig
        if args.train:  # training steps, each variant from the same weights
            for v in args.compare:
                fig, _ = run_variant(_variant(copy.deepcopy(base), v), loader, device, progress,
                                     f"{v} train", train=True, amp=amp, channels_last=cl,
                                     trace=trace_path(f"{v} train"))
                fig = D.merge_figures(D.gather(fig, world))
                fig["megapixels_per_s"] = fig["tiles_per_s"] * mpix
                report["variants"][f"{v} (train)"] = fig
        base.eval()
        ref = "naive" if "naive" in results else next(iter(results))
        ref_pred = {i: int(np.argmax(p)) for i, p in results[ref][1].items()}
        for v, (fig, preds) in results.items():
            fig["same_predictions_as_" + ref] = float(np.mean([int(np.argmax(p)) == ref_pred[i] for i, p in preds.items()]))
        if args.sample and lead:  # hard attention: K tiles drawn from a coarse attention map
            from .sampled import sampled_eager_variant, sampled_run

            sv, smodel = sampled_eager_variant(base, results)
            report["sampled"] = sampled_run(smodel, slide, path, mask, grid, args.sample, results[sv][0],
                                            results[sv][1], len(all_tiles), args.batch, device, args.num_classes,
                                            args.sample_seed, amp, cl, sv)
        if cam_maps is not None:  # the heatmap stitches the CAMs of the timed pass: no other pass
            target = positive_class(args.num_classes)
            report["cam"] = cam_info(base, target)
            hgrid = grid
            scores = TileScores(f"cam_class_{target}", cam_maps, results[cam_variant][1])
        else:
            # The heatmap covers all the tissue: one more pass of the fused model over the tissue
            # tiles of the job's resolution, or of a coarser level when those are too many.
            hgrid = heatmap_grid(slide, mask, grid)
            scores = score_tiles(base, path, hgrid, args, device, rank, world)
        report["heatmap"] = dict(kind=scores.kind, file="heatmap.png", shape=list(mask.shape), **hgrid.describe())
        if lead:
            report["heatmap"]["range"] = write_outputs(args.out, args.model, slide, thumb, mask, hgrid, scores, files)
            if args.explain == "guided-gradcam":  # pixel-level maps of the top-scoring tiles
                report["gallery"] = write_gallery(base, path, grid, results[ref][1], args.out, device,
                                                  args.num_classes)
                files.append(dict(file="gallery.png", what=OUTPUT_FILES["gallery.png"]))
        report["partial"] = False
    finally:
        report["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
        if lead:
            files.append(dict(file="report.json", what="every figure, the machine, versions, arguments"))
            files.append(dict(file="report.md", what="the side-by-side table and the list of files"))
            with open(os.path.join(args.out, "report.json"), "w") as f:
                json.dump(report, f, indent=2, default=str)
            with open(os.path.join(args.out, "report.md"), "w") as f:
                f.write(markdown(report) + "\n")
    return report


HEATMAP_TILES = 256


def heatmap_grid(slide, mask: np.ndarray, grid: TileGrid, limit: int = HEATMAP_TILES,
                 min_tissue: float = 0.1) -> TileGrid:
    """The tiles the heatmap pass scores: the tissue tiles (at least ``min_tissue``) at the
    job's resolution (``grid``'s level, read and model sizes), else at the first coarser level
    that has at most ``limit`` of them; levels too small to hold a tile are skipped. When no
    candidate has at most ``limit``, the coarsest one that has tiles."""
    candidates = [lambda: tile_grid(slide, mask, grid.level, grid.tile, min_tissue, read_size=grid.read_size)]
    for level in range(grid.level + 1, slide.level_count):
        W, H = slide.level_dimensions[level]
        if grid.tile > min(W, H):
            continue  # this level cannot hold a tile
        if slide.level_downsamples[level] * grid.tile <= grid.size0:
            continue  # not coarser than the job's own tiles
        candidates.append(lambda level=level: tile_grid(slide, mask, level, grid.tile, min_tissue))
    best = None
    for make in candidates:
        g = make()
        if len(g):
            best = g
            if len(g) <= limit:
                break
    return best if best is not None else grid


@dataclass
class TileScores:
    """What the heatmap pass found per tile (keys: indices into its grid): ``maps`` (a 2-D
    array each: the map stitched into the heatmap), ``probs`` (the class probabilities), and
    the ``kind`` of map (``cbam_spatial_gate``, ``vit_cls_attention``, ``gradcam``,
    ``cam_class_K``, ``probability_class_1``)."""
    kind: str
    maps: Dict[int, np.ndarray]
    probs: Dict[int, List[float]]

    def score(self, i: int) -> float:
        """One number per tile: the mean of its map."""
        return float(np.mean(self.maps[i]))


def score_tiles(base: torch.nn.Module, path: str, grid: TileGrid, args: ProfileArgs, device: str,
                rank: int = 0, world: int = 1) -> TileScores:
    """One pass of the fused model (``attnkern.convert`` of ``base``) over ``grid``'s tiles
    (this rank's share; gathered), with the map that ``args.explain`` asks for: ``attention``
    is the last CBAM's spatial gates (which the fused model keeps at no cost), or for a ViT the
    CLS token's attention over the patches in the last block (O(N) memory by
    :func:`attnkern.explain.attention_rows`), or for a model with neither the probability of
    class 1; ``gradcam`` (and ``guided-gradcam``, whose gallery is written apart) is Grad-CAM
    of the predicted class on the last stage (the grad-cam package). ``cam`` has no pass of its
    own: its maps come from the timed forward (:class:`CamPass`)."""
    import attnkern

    model = attnkern.convert(copy.deepcopy(base)).eval()
    mine = D.shard(len(grid), rank, world)
    loader = torch.utils.data.DataLoader(TileDataset(path, grid.subset(mine), indices=mine),
                                         batch_size=args.batch, num_workers=args.workers)
    if args.explain in ("gradcam", "guided-gradcam"):
        explainer = functools.partial(_gradcam_maps, option=f"--explain {args.explain}")
    elif any(isinstance(m, attnkern.Attention) for m in model.modules()):
        explainer = _vit_attention_maps
    elif any(isinstance(m, attnkern.CBAM) for m in model.modules()):
        explainer = _cbam_gate_maps
    else:
        explainer = _probability_maps
    kind, maps, probs = explainer(model, loader, device)
    maps = {i: m for part in D.gather(maps, world) for i, m in part.items()}
    probs = {i: p for part in D.gather(probs, world) for i, p in part.items()}
    return TileScores(kind, maps, probs)


def _collect(maps, probs, idx, g, logits):
    p = logits.float().softmax(dim=1).cpu()
    for j, i in enumerate(idx.tolist()):
        maps[i] = g[j]
        probs[i] = p[j].tolist()


def _cbam_gate_maps(model, loader, device):
    import attnkern

    cbam = [m for m in model.modules() if isinstance(m, attnkern.CBAM)][-1]
    cbam.keep_gates = True
    maps, probs = {}, {}
    with torch.inference_mode():
        for x, idx in loader:
            logits = model(x.to(device))
            _collect(maps, probs, idx, cbam.last_gates[1][:, 0].float().cpu().numpy(), logits)
    return "cbam_spatial_gate", maps, probs


def _vit_attention_maps(model, loader, device):
    """The CLS token's attention over the patch tokens, averaged over heads, per tile
    normalised to a maximum of 1."""
    import attnkern

    attn = [m for m in model.modules() if isinstance(m, attnkern.Attention)][-1]
    attn.keep_qk = True
    prefix = getattr(model, "num_prefix_tokens", 1)
    maps, probs = {}, {}
    with torch.inference_mode():
        for x, idx in loader:
            logits = model(x.to(device))
            q, k = attn.last_qk
            rows = attnkern.explain.attention_rows(q, k, 0)[:, :, 0, prefix:].mean(1)  # [B, patches]
            side = int(round(rows.shape[-1] ** 0.5))
            g = rows.reshape(-1, side, rows.shape[-1] // side).float().cpu().numpy()
            g = g / np.maximum(g.reshape(len(g), -1).max(axis=1), 1e-12)[:, None, None]
            _collect(maps, probs, idx, g, logits)
    return "vit_cls_attention", maps, probs


def _probability_maps(model, loader, device):
    maps, probs = {}, {}
    with torch.inference_mode():
        for x, idx in loader:
            logits = model(x.to(device))
            p = logits.float().softmax(dim=1)
            g = p[:, min(1, p.shape[1] - 1)].cpu().numpy()[:, None, None]
            _collect(maps, probs, idx, g, logits)
    return "probability_class_1", maps, probs


def _gradcam_target(model: torch.nn.Module, option: str = "--explain gradcam") -> torch.nn.Module:
    """The last stage of a timm CNN (``layer4[-1]`` / ``stages[-1]``), else its last conv;
    errors name ``option``."""
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        raise SlideError(f"{option} needs a convolutional model; for a ViT use --explain attention")
    for name in ("layer4", "stages", "features"):
        stage = getattr(model, name, None)
        if stage is not None and len(stage):
            return stage[-1]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise SlideError(f"{option} needs a convolutional model")
    return convs[-1]


def _gradcam_maps(model, loader, device, option: str = "--explain gradcam"):
    from pytorch_grad_cam import GradCAM

    maps, probs = {}, {}
    with GradCAM(model=model, target_layers=[_gradcam_target(model, option)]) as cam:
        for x, idx in loader:
            g = cam(input_tensor=x.to(device), targets=None)  # [B, tile, tile], predicted class
            _collect(maps, probs, idx, g, cam.outputs.detach())
    return "gradcam", maps, probs


KIND_LABELS = {
    "cbam_spatial_gate": "CBAM spatial gate of the last block",
    "vit_cls_attention": "CLS attention of the last block (per tile, max 1)",
    "gradcam": "Grad-CAM of the predicted class",
    "cam_class_0": "CAM of class 0 (classifier weights over the last feature maps)",
    "cam_class_1": "CAM of class 1 (classifier weights over the last feature maps)",
    "probability_class_1": "predicted probability of class 1",
}

OUTPUT_FILES = {
    "mask.png": "the tissue mask at thumbnail scale",
    "heatmap.png": "the per-tile maps over the thumbnail, with a colour bar and a title",
    "heatmap.npy": "the stitched map, float32 at thumbnail scale, NaN where no tile was scored",
    "tiles.csv": "one row per scored tile: level-0 x, y, size, level, score, class probabilities",
    "tiles.geojson": "one polygon per scored tile (level-0 pixels) with its measurements, for QuPath",
    "gallery.png": "guided Grad-CAM of the top-scoring tiles: tile, Grad-CAM, guided backprop, guided Grad-CAM",
    "report.json": "every figure, the machine, versions, arguments",
    "report.md": "the side-by-side table and the list of files",
}


def _save_mask(out: str, mask: np.ndarray, files: List[Dict[str, str]]) -> None:
    from PIL import Image

    Image.fromarray((mask * 255).astype(np.uint8)).save(os.path.join(out, "mask.png"))
    files.append(dict(file="mask.png", what=OUTPUT_FILES["mask.png"]))


def write_outputs(out: str, model: str, slide, thumb: np.ndarray, mask: np.ndarray, grid: TileGrid,
                  scores: TileScores, files: List[Dict[str, str]]) -> List[float]:
    """Write heatmap.png, heatmap.npy, tiles.csv and tiles.geojson into ``out``, appending
    each to ``files``; returns the heatmap's colour range [low, high]."""
    from ..explain.heatmap import colour_range, save_heatmap, stitch

    order = sorted(scores.maps)
    heat = stitch([scores.maps[i] for i in order], [grid.coords[i] for i in order], grid.size0, slide.dimensions,
                  mask.shape)
    np.save(os.path.join(out, "heatmap.npy"), heat)
    lo, hi = colour_range(heat, mask)
    label = KIND_LABELS.get(scores.kind, scores.kind)
    res = f", {grid.mpp:.3g} um/px" if grid.mpp else ""
    title = f"{model}: {label}\n{len(order)} tiles of {grid.tile} px (level {grid.level}{res}), colour range {lo:.3g} to {hi:.3g}"
    save_heatmap(os.path.join(out, "heatmap.png"), thumb, heat, mask, title=title, label=label)
    rows = tile_table(grid, scores)
    write_csv(os.path.join(out, "tiles.csv"), rows)
    write_geojson(os.path.join(out, "tiles.geojson"), rows, scores.kind)
    for name in ("heatmap.png", "heatmap.npy", "tiles.csv", "tiles.geojson"):
        files.append(dict(file=name, what=OUTPUT_FILES[name]))
    return [lo, hi]


def tile_table(grid: TileGrid, scores: TileScores) -> List[Dict]:
    """One dict per scored tile: level-0 ``x``, ``y``, ``size`` (px), ``level`` read,
    ``score`` (the mean of its map), ``predicted_class`` and ``prob_class_K``."""
    rows = []
    for i in sorted(scores.maps):
        x, y = grid.coords[i]
        p = scores.probs[i]
        row = dict(x=x, y=y, size=round(grid.size0, 3), level=grid.level, score=scores.score(i),
                   predicted_class=int(np.argmax(p)))
        row.update({f"prob_class_{k}": float(v) for k, v in enumerate(p)})
        rows.append(row)
    return rows


def write_csv(path: str, rows: List[Dict]) -> None:
    import csv

    fields = list(rows[0]) if rows else ["x", "y", "size", "level", "score", "predicted_class"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def write_geojson(path: str, rows: List[Dict], kind: str) -> None:
    """A GeoJSON FeatureCollection as QuPath reads it (File > Import objects): one ``tile``
    object per row, its square in level-0 pixels, its numbers as ``measurements`` and its
    predicted class as ``classification``."""
    feats = []
    for r in rows:
        x, y, s = r["x"], r["y"], r["size"]
        ring = [[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]
        meas = {k: v for k, v in r.items() if k not in ("x", "y", "size", "predicted_class")}
        feats.append(dict(type="Feature", geometry=dict(type="Polygon", coordinates=[ring]),
                          properties=dict(objectType="tile", name=f"tile {x},{y}",
                                          classification=dict(name=f"class {r['predicted_class']}"),
                                          measurements=dict(meas, **{kind: r["score"]}))))
    with open(path, "w") as f:
        json.dump(dict(type="FeatureCollection", features=feats), f)


def markdown(report: Dict) -> str:
    s = report["slide"]
    t = report.get("tiles", {})
    a = report["args"]
    where = f"level {t.get('level', a['level'])}"
    if t.get("mpp"):
        where += f", {t['mpp']:.3g} um/px"
    if t.get("read_size") and t.get("read_size") != t.get("tile"):
        where += f", read {t['read_size']} px and resized"
    lines = [f"Slide `{os.path.basename(s['path'])}` {s['dimensions'][0]} x {s['dimensions'][1]} px, "
             f"{s['tissue_tiles']} tissue tiles, {s['profiled_tiles']} profiled; model "
             f"`{a['model']}`, tile {a['tile']} px ({where}), batch {a['batch']}, "
             f"{report['machine']['threads']} threads" + (" (partial run)" if report["partial"] else ""), "",
             f"CPU: {report['machine'].get('cpu', 'not recorded')}; C++ kernels: "
             f"{report['machine'].get('cpu_kernels') or 'not loaded'}", "",
             f"Memory allocator (every variant): {report['machine'].get('allocator', 'not recorded')}", "",
             "| variant | tiles/s | megapixels/s | read s | compute s | bound by | peak RSS MB | same predictions |",
             "|---|---|---|---|---|---|---|---|"]
    for v, f in report["variants"].items():
        same = next((val for k, val in f.items() if k.startswith("same_predictions_as_")), None)
        lines.append(f"| {v} | {f['tiles_per_s']:.2f} | {f.get('megapixels_per_s', 0):.2f} | {f['read_seconds']:.2f} | "
                     f"{f['compute_seconds']:.2f} | {f['bound']} | {f['peak_rss_mb']:.0f} | "
                     f"{'' if same is None else f'{same:.0%}'} |")
    lines += markdown_lines(report)
    files = report.get("files") or []
    if files:
        lines += ["", "Files written:", ""] + [f"- `{f['file']}`: {f['what']}" for f in files]
    return "\n".join(lines)
