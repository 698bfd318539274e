import os

import numpy as np
import pytest


@pytest.fixture(scope="session")
def small_slide(tmp_path_factory):
    """A 2048 px sample slide with tissue islands, written like the built-in one."""
    from attnkern.slides.sample import render, write_pyramid

    path = str(tmp_path_factory.mktemp("slides") / "islands.tiff")
    write_pyramid(path, render(2048), downsamples=(1, 4, 8))
    return path


@pytest.fixture(scope="session")
def blank_slide(tmp_path_factory):
    from attnkern.slides.sample import write_pyramid

    path = str(tmp_path_factory.mktemp("slides") / "blank.tiff")
    img = np.full((1024, 1024, 3), 242, np.uint8)
    write_pyramid(path, img, downsamples=(1, 4))
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Tests never write into the user's real cache."""
    monkeypatch.setenv("ATTNKERN_CACHE", str(tmp_path / "cache"))
