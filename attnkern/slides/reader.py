"""Opening slides with OpenSlide (openslide-python, with its C library from the openslide-bin
wheel: no system package needed), with one clear error for anything that is not a readable
slide."""
from __future__ import annotations

import os


class SlideError(Exception):
    """A slide that cannot be used: missing, not a slide, corrupt, no tissue, bad tile size."""


def open_slide(path: str):
    """An ``openslide.OpenSlide`` for ``path`` (SVS, pyramidal TIFF, and what else OpenSlide
    reads), or :class:`SlideError` with the reason."""
    import openslide

    if not os.path.exists(path):
        raise SlideError(f"no such file: {path}")
    if os.path.isdir(path):
        raise SlideError(f"{path} is a directory, not a slide")
    try:
        slide = openslide.OpenSlide(path)
        slide.read_region((0, 0), slide.level_count - 1, (1, 1))  # touch the data, not just the header
        return slide
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(f"{path} is not a slide OpenSlide can read") from None
    except openslide.OpenSlideError as e:
        raise SlideError(f"{path} is unreadable (corrupt or truncated?): {e}") from None
