"""Synthetic slide content for the slide tests: H&E-like stained tissue, glass, and the dark
non-tissue areas scanners leave (pure black, near-black noise, dark grey)."""
import numpy as np

GLASS = (242, 242, 246)
PINK = (232, 160, 205)    # eosin
PURPLE = (120, 70, 160)   # haematoxylin


def stain(rng, shape, light=PINK, dark=PURPLE, noise=6.0):
    """[h, w, 3] uint8 tissue: a smooth random mix of two stain colours plus pixel noise."""
    h, w = shape
    coarse = rng.random((max(2, h // 16), max(2, w // 16)))
    mix = np.kron(coarse, np.ones((16, 16)))[:h, :w]
    mix = np.pad(mix, ((0, max(0, h - mix.shape[0])), (0, max(0, w - mix.shape[1]))), mode="edge")
    col = (1 - mix[..., None]) * np.array(light, float) + mix[..., None] * np.array(dark, float)
    return np.clip(col + rng.normal(0, noise, (h, w, 3)), 0, 255).astype(np.uint8)


def glass(shape):
    img = np.empty(tuple(shape) + (3,), np.uint8)
    img[...] = GLASS
    return img


def near_black(rng, shape, mean=6.0, std=3.0):
    """Scanner 'black': RGB values of mean ``mean`` and standard deviation ``std``, every
    channel independent."""
    return np.clip(rng.normal(mean, std, tuple(shape) + (3,)), 0, 255).round().astype(np.uint8)


def ellipse(shape, cy, cx, ry, rx):
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def dark_quarter_slide(seed=0, size=2048):
    """The issue's slide: three pink-purple islands on glass on the left, near-black noise (mean
    6, std 3) over the right quarter. Returns (image, island mask)."""
    rng = np.random.default_rng(seed)
    img = glass((size, size))
    tissue = stain(rng, (size, size))
    s = size / 2048
    islands = np.zeros((size, size), bool)
    for cy, cx, ry, rx in ((400, 450, 260, 300), (1050, 700, 280, 230), (1650, 500, 250, 330)):
        islands |= ellipse((size, size), cy * s, cx * s, ry * s, rx * s)
    img[islands] = tissue[islands]
    q = size * 3 // 4
    img[:, q:] = near_black(rng, (size, size - q))
    return img, islands
