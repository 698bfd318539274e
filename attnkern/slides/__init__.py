"""Whole-slide images: reading (OpenSlide), the built-in sample slide, tissue detection,
tiling, and the ``attnkern profile`` job."""
from .reader import SlideError, open_slide
from .sample import sample_slide_path
from .tiling import TileDataset, TileGrid, resolution_grid, slide_mpp, tile_grid
from .tissue import tissue_mask

__all__ = ["SlideError", "open_slide", "sample_slide_path", "tissue_mask", "tile_grid", "resolution_grid", "slide_mpp", "TileGrid", "TileDataset"]
