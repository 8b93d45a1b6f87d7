"""Drawing one image of the demo's shapes dataset: a shape (the class) at a difficulty from
0 (large, centred, high contrast, plain background) to 1 (small, faint, anywhere, among
clutter). :mod:`utils.data.synthetic` writes the dataset of such images."""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Sequence

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "plus", "triangle_up", "ring", "cross", "triangle_down", "square", "frame")
"""Class names in the order ``num_classes`` takes them. The first six are three pairs whose
members differ grossly when large and only in fine detail when small: circle/ring (a hole),
plus/cross (arms at 0 or 45 degrees), triangle up/down. Square and frame are extra classes
that even large images tell apart from circle and ring only by their corners."""
POSITION_SPREAD: tuple[float, float] = (0.1, 0.3)
"""How far from the centre the shape may sit, as a fraction of the room left in the crop,
at difficulty 0 and 1."""


class ImageParams(NamedTuple):
    """How one image is drawn; every field follows from the difficulty and the image's seed."""
    difficulty: float
    radius: float  # shape size, pixels
    contrast: float  # shape/background intensity difference, 0..1
    shading: float  # amplitude of the background's linear shading
    clutter: int  # number of distractor fragments
    rotation: float  # degrees


def stored_size(img_size: int, crop_pct: float) -> int:
    """Side of the stored images: what the evaluation transform resizes to before cropping."""
    return int(img_size / crop_pct)


def _box(x: np.ndarray, y: np.ndarray, a: float, b: float) -> np.ndarray:
    """Signed distance to an axis-aligned rectangle of half-sides (a, b)."""
    qx, qy = np.abs(x) - a, np.abs(y) - b
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return outside + np.minimum(np.maximum(qx, qy), 0)


def _triangle(x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Signed distance to an upright equilateral triangle of half-side ``r`` centred on its centroid."""
    k = math.sqrt(3.0)
    x = np.abs(x) - r
    y = -y + r / k  # image rows grow downwards; the apex points up
    fold = x + k * y > 0
    x, y = np.where(fold, (x - k * y) / 2, x), np.where(fold, (-k * x - y) / 2, y)
    x = x - np.clip(x, -2 * r, 0)
    return -np.hypot(x, y) * np.sign(y)


def _shape_sdf(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) to a class shape of size ``r`` at the origin."""
    if shape == "circle":
        return np.hypot(x, y) - r
    if shape == "ring":  # outer radius r, hole of radius r / 2
        return np.abs(np.hypot(x, y) - 0.75 * r) - 0.25 * r
    if shape == "square":
        return _box(x, y, 0.8 * r, 0.8 * r)
    if shape == "frame":  # a square with a square hole of half its side
        return np.maximum(_box(x, y, 0.8 * r, 0.8 * r), -_box(x, y, 0.4 * r, 0.4 * r))
    if shape == "triangle_up":
        return _triangle(x, y, 1.05 * r)
    if shape == "triangle_down":
        return _triangle(x, -y, 1.05 * r)
    if shape == "plus":
        return np.minimum(_box(x, y, r, 0.3 * r), _box(x, y, 0.3 * r, r))
    if shape == "cross":  # the plus turned by 45 degrees
        u, v = (x + y) * math.sqrt(0.5), (y - x) * math.sqrt(0.5)
        return np.minimum(_box(u, v, r, 0.3 * r), _box(u, v, 0.3 * r, r))
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _fragment_sdf(kind: int, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Signed distance to a distractor: a piece of a shape, never a whole one."""
    if kind == 0:  # segment, like a side of a square or triangle
        return _box(x, y, 0.8 * r, 0.15 * r + 0.35)
    if kind == 1:  # dot, smaller than any circle
        return np.hypot(x, y) - 0.35 * r
    if kind == 2:  # half of a ring
        return np.maximum(np.abs(np.hypot(x, y) - 0.75 * r) - 0.25 * r, y)
    return np.minimum(_box(x - 0.4 * r, y, 0.55 * r, 0.15 * r + 0.35),  # corner, like a frame's
                      _box(x, y - 0.4 * r, 0.15 * r + 0.35, 0.55 * r))


def _coverage(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased pixel coverage of the inside of a signed distance field."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


# How far each class shape reaches from its centre, in units of its size r.
_REACH = {"circle": 1.0, "ring": 1.0, "plus": 1.05, "cross": 1.05, "triangle_up": 1.22, "triangle_down": 1.22,
          "square": 1.14, "frame": 1.14}
_FRAGMENT_REACH = 1.0


def _stamp(img: np.ndarray, cx: float, cy: float, reach: float, degrees: float,
           sdf: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> tuple[tuple[slice, slice], np.ndarray]:
    """Coverage of a shape centred at (cx, cy), computed only in its bounding window.

    Args:
        img: the (H, W, 3) canvas (only its size is read).
        reach: how far the shape extends from its centre, pixels.
        degrees: rotation of the shape.
        sdf: ``sdf(x, y)`` signed distance in the shape's own frame.

    Returns:
        The window's (rows, columns) slices and the (h, w, 1) coverage inside it.
    """
    h, w = img.shape[:2]
    x0, x1 = max(int(cx - reach) - 1, 0), min(int(cx + reach) + 2, w)
    y0, y1 = max(int(cy - reach) - 1, 0), min(int(cy + reach) + 2, h)
    window = (slice(y0, max(y0, y1)), slice(x0, max(x0, x1)))
    yy, xx = np.mgrid[y0:max(y0, y1), x0:max(x0, x1)].astype(np.float64) + 0.5  # pixel centres
    t = math.radians(degrees)
    dx, dy = xx - cx, yy - cy
    x, y = math.cos(t) * dx + math.sin(t) * dy, -math.sin(t) * dx + math.cos(t) * dy
    return window, _coverage(sdf(x, y))[..., None]


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t


def image_params(difficulty: float, img_size: int, rng: np.random.Generator) -> ImageParams:
    """Draw the parameters of one image of the given difficulty (0 easy .. 1 hard)."""
    d = float(difficulty)
    jitter = rng.uniform(0.9, 1.1, size=2)
    return ImageParams(
        difficulty=d,
        radius=img_size * _lerp(0.32, 0.06, d) * jitter[0],
        contrast=min(_lerp(0.75, 0.4, d) * jitter[1], 0.8),
        shading=_lerp(0.0, 0.15, d),
        clutter=int(round(_lerp(0.0, 5.0, d) + rng.uniform(-0.5, 0.5))),
        rotation=float(rng.uniform(-15.0, 15.0)),
    )


def _colours(contrast: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A light background and a darker shape, ``contrast`` apart in brightness, both nearly
    grey (ink on paper: one polarity and no colour, so the classes need no colour invariance
    and a tiny transformer learns them in minutes)."""
    level = rng.uniform(min(max(contrast + 0.15, 0.6), 0.9), 0.95)
    background = np.clip(level + rng.uniform(-0.02, 0.02, size=3), 0, 1)
    return background, np.clip(background - contrast * rng.uniform(0.95, 1.05, size=3), 0, 1)


def render_shape_image(
        shape: str,
        difficulty: float,
        img_size: int = 48,
        crop_pct: float = 0.875,
        seed: int | Sequence[int] = 0,
) -> tuple[np.ndarray, ImageParams]:
    """Draw one image.

    Args:
        shape: one of :data:`SHAPES`.
        difficulty: 0 (large, centred, high contrast, plain) .. 1 (small, faint, cluttered, noisy).
        img_size: side of the central crop the shape stays inside.
        crop_pct: ``img_size`` over the side of the stored image.
        seed: seed (or seed words) of this image's random draws.

    Returns:
        ``(H, W, 3)`` uint8 image with ``H = W = stored_size(img_size, crop_pct)``, and its
        drawing parameters.
    """
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    rng = np.random.default_rng(seed)
    size = stored_size(img_size, crop_pct)
    p = image_params(difficulty, img_size, rng)
    background, colour = _colours(p.contrast, rng)

    # background with linear shading in a random direction
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (np.arange(size) + 0.5 - size / 2) / size  # -0.5..0.5
    shade = ramp[None, :] * math.cos(angle) + ramp[:, None] * math.sin(angle)  # (H, W)
    img = (background[None, None, :] + p.shading * shade[..., None]).astype(np.float32)

    # the shape's centre: near the middle when easy, anywhere in the crop when hard
    margin = (size - img_size) / 2
    reach = _REACH[shape] * p.radius + 1.0
    free = max(img_size / 2 - reach, 0.0)
    cx, cy = size / 2 + rng.uniform(-1, 1, size=2) * free * _lerp(*POSITION_SPREAD, p.difficulty)

    # distractor fragments of the same contrast, kept off the shape itself
    for _ in range(p.clutter):
        for _attempt in range(8):
            fx, fy = rng.uniform(margin * 0.5, size - margin * 0.5, size=2)
            if math.hypot(fx - cx, fy - cy) > 1.6 * p.radius + 1.5:
                break
        fr = p.radius * rng.uniform(0.6, 1.1)
        kind = int(rng.integers(4))
        window, alpha = _stamp(img, fx, fy, _FRAGMENT_REACH * fr + 1.0, rng.uniform(0, 360),
                               lambda x, y: _fragment_sdf(kind, x, y, fr))
        img[window] -= alpha * p.contrast * rng.uniform(0.9, 1.1)

    window, alpha = _stamp(img, cx, cy, reach, p.rotation, lambda x, y: _shape_sdf(shape, x, y, p.radius))
    img[window] = img[window] * (1 - alpha) + alpha * colour
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), p
