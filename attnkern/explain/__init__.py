"""Where a model looks: attention maps of ViTs in O(N) memory (the attention of chosen query
rows, and the attention each token receives), heatmaps of per-tile scores stitched over a
slide thumbnail, class activation maps from the forward pass (CAM), Guided Backpropagation
and Guided Grad-CAM, and hard attention by attention sampling."""
from .attention import attention_received, attention_rows
from .cam import cam
from .guided import guided_backprop, guided_gradcam
from .heatmap import colour_range, overlay, save_heatmap, stitch
from .sampling import attention_sample, sampled_expectation

__all__ = ["attention_rows", "attention_received", "stitch", "overlay", "colour_range", "save_heatmap", "cam",
           "guided_backprop", "guided_gradcam", "attention_sample", "sampled_expectation"]
