"""Where a model looks: attention maps of ViTs in O(N) memory (the attention of chosen query
rows, and the attention each token receives) and heatmaps of per-tile scores stitched over a
slide thumbnail."""
from .attention import attention_received, attention_rows
from .heatmap import colour_range, overlay, save_heatmap, stitch

__all__ = ["attention_rows", "attention_received", "stitch", "overlay", "colour_range", "save_heatmap"]
