"""``attnkern profile``: throughput of a model over the tissue of a slide, with attnkern's kernels
("fused": the model after :func:`attnkern.convert`), without them ("naive": the model as timm
builds it), with ``torch.compile`` of it ("compile") and of the converted model
("fused-compile"); reading and compute time apart; and a heatmap of where the model looks.

Outputs in ``--out``: ``report.json`` (every figure, the machine, versions, arguments; marked
``partial`` if the run was interrupted), ``report.md`` (the side-by-side table),
``heatmap.png`` (the last stage's CBAM spatial gates stitched over the thumbnail; for a ViT
the CLS token's attention over the patches of the last block; for other models the tiles'
predicted probability of class 1) and ``mask.png`` (the tissue).
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from . import dist as D
from .explain_tiles import EXPLAIN, CamPass, cam_info, markdown_lines, positive_class, write_gallery
from .reader import SlideError, open_slide
from .sample import sample_slide_path
from .tiling import TileDataset, tile_grid
from .tissue import tissue_mask

MODELS = {
    "cbam_resnet50": ("resnet50", dict(block_args=dict(attn_layer="cbam"))),
    "cbam_resnet18": ("resnet18", dict(block_args=dict(attn_layer="cbam"))),
    "seresnet50": ("seresnet50", {}),
    "resnet50": ("resnet50", {}),
    # ViTs take any tile size (position embeddings interpolated); the heatmap is the CLS token's
    # attention over the patches in the last block, from attnkern.explain.attention_rows.
    "vit_small": ("vit_small_patch16_224", dict(dynamic_img_size=True)),
    "vit_tiny": ("vit_tiny_patch16_224", dict(dynamic_img_size=True)),
}
VARIANTS = ("naive", "compile", "fused", "fused-compile")
THUMB = 1024


@dataclass
class ProfileArgs:
    slide: Optional[str] = None
    model: str = "cbam_resnet50"
    checkpoint: Optional[str] = None
    tile: int = 256
    level: int = 0
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
    channels_last: Optional[bool] = None  # None: on CUDA yes, on CPU no
    trace: bool = False                   # a torch.profiler trace of each variant's pass
    sample: int = 0                       # --sample K: attention sampling of K tiles (0: off)
    sample_seed: int = 0


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def amp_dtype(args: ProfileArgs, device: str) -> Optional[torch.dtype]:
    """The autocast dtype of the timed passes: ``auto`` is bfloat16 on CUDA, none on CPU."""
    if args.amp == "auto":
        return torch.bfloat16 if device.startswith("cuda") else None
    return AMP_DTYPES[args.amp]


def use_channels_last(args: ProfileArgs, device: str) -> bool:
    return device.startswith("cuda") if args.channels_last is None else bool(args.channels_last)


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


def _machine() -> Dict:
    return dict(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
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
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SlideError("--device cuda asked for, but no CUDA device is available")
    rank, world, device, started = D.setup(args.device)
    try:
        return _profile(args, rank, world, device)
    finally:
        if started:
            torch.distributed.destroy_process_group()


def _profile(args: ProfileArgs, rank: int, world: int, device: str) -> Dict:
    from PIL import Image

    from ..explain.heatmap import overlay, stitch

    lead = rank == 0
    path = args.slide or (sample_slide_path() if lead else None)
    if world > 1:
        path = D.gather(path, world)[0]  # rank 0 creates the sample once
    slide = open_slide(path)
    thumb = np.asarray(slide.get_thumbnail((THUMB, THUMB)).convert("RGB"))
    mask = tissue_mask(thumb)
    if not mask.any():
        raise SlideError(f"no tissue found in {path}")
    coords = tile_grid(slide, mask, args.level, args.tile)
    if not coords:
        raise SlideError(f"no {args.tile} px tile at level {args.level} is mostly tissue in {path}")
    total_tiles = len(coords)
    if len(coords) > args.max_tiles:  # spread the sample over the whole tissue, deterministically
        keep = np.linspace(0, len(coords) - 1, args.max_tiles).round().astype(int)
        coords = [coords[i] for i in keep]
    if lead:
        os.makedirs(args.out, exist_ok=True)
        Image.fromarray((mask * 255).astype(np.uint8)).save(os.path.join(args.out, "mask.png"))

    report = dict(partial=True, started=_dt.datetime.now().isoformat(timespec="seconds"),
                  slide=dict(path=os.path.abspath(path), dimensions=slide.dimensions,
                             levels=slide.level_count, mpp=slide.properties.get("openslide.mpp-x"),
                             tissue_fraction=float(mask.mean()), tissue_tiles=total_tiles,
                             profiled_tiles=len(coords)),
                  args=asdict(args), machine=_machine(), world_size=world, variants={})
    tile0 = args.tile * slide.level_downsamples[args.level]
    mpix = args.tile * args.tile / 1e6
    base = build_model(args.model, args.num_classes, args.checkpoint).to(device)
    cl, amp = use_channels_last(args, device), amp_dtype(args, device)
    if cl:
        base = base.to(memory_format=torch.channels_last)

    def trace_path(v):
        return os.path.join(args.out, f"trace-{v.replace(' ', '-')}.json") if args.trace and lead else None

    mine = D.shard(len(coords), rank, world)
    loader = torch.utils.data.DataLoader(
        TileDataset(path, [coords[i] for i in mine], args.level, args.tile, indices=mine),
        batch_size=args.batch, shuffle=False,
        num_workers=args.workers, pin_memory=device.startswith("cuda"),
        persistent_workers=False, prefetch_factor=4 if args.workers else None)
    results, heat_maps = {}, None
    try:
        progress = args.progress and lead
        cam_maps = None
        for v in args.compare:
            model = _variant(base, v)
            cam_pass = CamPass(model, positive_class(args.num_classes)) if args.explain == "cam" else None
            fig, preds = run_variant(cam_pass or model, loader, device, progress, v, amp=amp, channels_last=cl,
                                     trace=trace_path(v))
            if cam_pass is not None:  # CAM of every profiled tile, computed in the timed forward
                maps_v = cam_pass.finish(mine, fig)
                cam_maps = cam_maps or {i: m for part in D.gather(maps_v, world) for i, m in part.items()}
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
        # The heatmap covers all the tissue: one more pass of the fused model at the finest level
        # whose tissue tiles number at most HEATMAP_TILES (the timed passes took a sample).
        if args.sample and lead:  # hard attention: K tiles drawn from a coarse attention map
            from .sampled import sampled_eager_variant, sampled_run

            sv, smodel = sampled_eager_variant(base, results)
            report["sampled"] = sampled_run(smodel, slide, path, mask, coords, args.level, args.tile, args.sample,
                                            results[sv][0], results[sv][1], total_tiles, args.batch, device,
                                            args.num_classes, args.sample_seed, amp, cl, sv)
        if cam_maps is not None:
            report["cam"] = cam_info(base, positive_class(args.num_classes))
        hm = ((f"cam_class_{report['cam']['target_class']}", cam_maps), coords, tile0) if cam_maps is not None \
            else _heatmap_pass(base, slide, path, mask, args, device, rank, world)
        if hm is not None:
            heat_maps, hm_coords, hm_tile0 = hm
        else:
            hm_coords, hm_tile0 = coords, tile0
        if heat_maps is None:  # no CBAM in the model: show the predicted probability of class 1
            any_preds = next(iter(results.values()))[1]
            heat_maps = ("probability_class_1", {i: np.full((1, 1), p[min(1, len(p) - 1)]) for i, p in any_preds.items()})
        kind, maps = heat_maps
        order = sorted(maps)
        if lead:
            heat = stitch([maps[i] for i in order], [hm_coords[i] for i in order], hm_tile0, slide.dimensions,
                          mask.shape)
            Image.fromarray(overlay(thumb, heat, mask)).save(os.path.join(args.out, "heatmap.png"))
            if args.explain == "guided-gradcam":  # pixel-level maps of the top-scoring tiles
                report["gallery"] = write_gallery(base, path, coords, args.level, args.tile, results[ref][1],
                                                  args.out, device, args.num_classes)
        report["heatmap"] = dict(kind=kind, file="heatmap.png", shape=list(mask.shape))
        report["partial"] = False
    finally:
        report["finished"] = _dt.datetime.now().isoformat(timespec="seconds")
        if lead:
            with open(os.path.join(args.out, "report.json"), "w") as f:
                json.dump(report, f, indent=2, default=str)
            with open(os.path.join(args.out, "report.md"), "w") as f:
                f.write(markdown(report) + "\n")
    return report


HEATMAP_TILES = 256


def _heatmap_level(slide, mask, args):
    """The finest level whose tissue tiles number at most HEATMAP_TILES, and those tiles."""
    coords, level = [], args.level
    for level in range(args.level, slide.level_count):
        W, H = slide.level_dimensions[level]
        if args.tile > min(W, H):
            break
        coords = tile_grid(slide, mask, level, args.tile, min_tissue=0.1)
        if coords and len(coords) <= HEATMAP_TILES:
            break
    return level, coords


def _gradcam_target(model: torch.nn.Module) -> torch.nn.Module:
    """The last stage of a timm CNN (``layer4[-1]`` / ``stages[-1]``), else its last conv."""
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        raise SlideError("--explain gradcam needs a convolutional model; for a ViT use --explain attention")
    for name in ("layer4", "stages", "features"):
        stage = getattr(model, name, None)
        if stage is not None and len(stage):
            return stage[-1]
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    if not convs:
        raise SlideError("--explain gradcam needs a convolutional model")
    return convs[-1]


def _heatmap_pass(base, slide, path, mask, args, device, rank=0, world=1):
    """Per-tile maps over every tissue tile of the finest level with at most HEATMAP_TILES of
    them, from the fused model: its last CBAM's spatial gates (``attention``), or Grad-CAM of
    the predicted class on the last stage (``gradcam``, the grad-cam package); for a ViT the
    CLS token's attention over the patches in the last block (``attention``, computed in O(N)
    memory by :func:`attnkern.explain.attention_rows`). None when ``attention`` is asked of a
    model with neither."""
    import attnkern

    model = attnkern.convert(copy.deepcopy(base)).eval()
    cbams = [m for m in model.modules() if isinstance(m, attnkern.CBAM)]
    attns = [m for m in model.modules() if isinstance(m, attnkern.Attention)]
    if args.explain == "attention" and not cbams and not attns:
        return None
    level, coords = _heatmap_level(slide, mask, args)
    if not coords:
        return None
    mine = D.shard(len(coords), rank, world)
    loader = torch.utils.data.DataLoader(TileDataset(path, [coords[i] for i in mine], level, args.tile, indices=mine),
                                         batch_size=args.batch, num_workers=args.workers)
    maps = {}
    if args.explain in ("gradcam", "guided-gradcam"):
        from pytorch_grad_cam import GradCAM

        with GradCAM(model=model, target_layers=[_gradcam_target(model)]) as cam:
            for x, idx in loader:
                g = cam(input_tensor=x.to(device), targets=None)  # [B, tile, tile], predicted class
                for j, i in enumerate(idx.tolist()):
                    maps[i] = g[j]
        kind = "gradcam"
    elif attns:  # a ViT: the CLS token's attention over the patch tokens, averaged over heads
        attn = attns[-1]
        attn.keep_qk = True
        prefix = getattr(model, "num_prefix_tokens", 1)
        with torch.inference_mode():
            for x, idx in loader:
                model(x.to(device))
                q, k = attn.last_qk
                rows = attnkern.explain.attention_rows(q, k, 0)[:, :, 0, prefix:].mean(1)  # [B, patches]
                side = int(round(rows.shape[-1] ** 0.5))
                g = rows.reshape(-1, side, rows.shape[-1] // side).float().cpu().numpy()
                for j, i in enumerate(idx.tolist()):
                    maps[i] = g[j] / max(float(g[j].max()), 1e-12)
        kind = "vit_cls_attention"
    else:
        cbams[-1].keep_gates = True
        with torch.inference_mode():
            for x, idx in loader:
                model(x.to(device))
                g = cbams[-1].last_gates[1][:, 0].float().cpu().numpy()
                for j, i in enumerate(idx.tolist()):
                    maps[i] = g[j]
        kind = "cbam_spatial_gate"
    maps = {i: m for part in D.gather(maps, world) for i, m in part.items()}
    return (kind, maps), coords, args.tile * slide.level_downsamples[level]


def markdown(report: Dict) -> str:
    s = report["slide"]
    lines = [f"Slide `{os.path.basename(s['path'])}` {s['dimensions'][0]} x {s['dimensions'][1]} px, "
             f"{s['tissue_tiles']} tissue tiles, {s['profiled_tiles']} profiled; model "
             f"`{report['args']['model']}`, tile {report['args']['tile']} px at level "
             f"{report['args']['level']}, batch {report['args']['batch']}, "
             f"{report['machine']['threads']} threads" + (" (partial run)" if report["partial"] else ""), "",
             "| variant | tiles/s | megapixels/s | read s | compute s | bound by | peak RSS MB | same predictions |",
             "|---|---|---|---|---|---|---|---|"]
    for v, f in report["variants"].items():
        same = next((val for k, val in f.items() if k.startswith("same_predictions_as_")), None)
        lines.append(f"| {v} | {f['tiles_per_s']:.2f} | {f.get('megapixels_per_s', 0):.2f} | {f['read_seconds']:.2f} | "
                     f"{f['compute_seconds']:.2f} | {f['bound']} | {f['peak_rss_mb']:.0f} | "
                     f"{'' if same is None else f'{same:.0%}'} |")
    lines += markdown_lines(report)
    return "\n".join(lines)
