"""Attention maps: heatmaps of per-tile scores stitched over a slide thumbnail."""
from .heatmap import overlay, stitch

__all__ = ["stitch", "overlay"]
