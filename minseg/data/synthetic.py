"""SyntheticScenes: seeded aerial-style scenes with 4 classes, made on the fly.

Each scene is painted layer by layer on a textured ground, so later layers
occlude earlier ones (a tree may cover a roof or a river bank)::

    0 background  ground: soil/grass colours, low-frequency blotches, grey roads,
                  and dark building shadows (ground, not building)
    1 building    rotated rectangles; roofs in red, grey, white, brown or blue
                  with a lit and a shaded half split along the ridge
    2 tree        clusters of round crowns, dark at the rim, bright at the top
    3 water       rivers (thick curves) and ponds (ellipses), rippled

Colour alone does not solve it: grass and trees are both green (trees are
darker and grainier), grey roads look like grey roofs (roads are long strips
of ground), and water may be dark like shadows. On top, every scene gets its
own brightness, contrast and tint, and pixel noise.

Scene ``i`` of ``SyntheticScenes(n, size, seed)`` depends only on
``(seed, i, size)``: it is drawn with ``np.random.default_rng([seed, i])``,
so any scene can be regenerated alone and two datasets with the same seed agree.
"""
from __future__ import annotations

import numpy as np

from .dataset import Dataset

CLASSES = ("background", "building", "tree", "water")


def _smooth_noise(rng, size: int, cells: int) -> np.ndarray:
    """A smooth random field in [0, 1]: a ``cells`` x ``cells`` grid, bilinearly upsampled to size x size."""
    grid = rng.random((cells + 1, cells + 1))
    t = np.linspace(0, cells, size, endpoint=False)
    i = t.astype(int)
    f = t - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
    return rows[:, i] * (1 - f) + rows[:, i + 1] * f


def _paint(image, region, colour, texture):
    """Paint ``colour`` (3,) modulated by ``texture`` (H, W) where ``region`` is True."""
    image[:, region] = colour[:, None] * texture[region]


def _rotated_rect(yy, xx, cy, cx, half_h, half_w, angle):
    """A rectangle centred at (cy, cx), rotated by ``angle``: (mask, distance of each pixel
    inside the border (negative outside), signed coordinate along the height axis)."""
    c, s = np.cos(angle), np.sin(angle)
    u = (xx - cx) * c + (yy - cy) * s
    v = -(xx - cx) * s + (yy - cy) * c
    inside = np.minimum(half_w - np.abs(u), half_h - np.abs(v))
    return inside >= 0, inside, v


def make_scene(rng: np.random.Generator, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """One scene: image (3, size, size) float32 in [0, 1] and mask (size, size) int64."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    scale = size / 64.0
    image = np.empty((3, size, size))
    mask = np.zeros((size, size), dtype=np.int64)

    # Ground: a soil or grass base with large blotches and fine grain.
    soil = np.array([0.55, 0.45, 0.32]) + rng.normal(0, 0.05, 3)
    grass = np.array([0.45, 0.55, 0.30]) + rng.normal(0, 0.05, 3)
    mix = _smooth_noise(rng, size, 3)[None] * rng.random()
    image[:] = (soil[:, None, None] * (1 - mix) + grass[:, None, None] * mix) * (
        0.85 + 0.3 * _smooth_noise(rng, size, 6)
    )
    image *= 1 + 0.06 * rng.standard_normal((1, size, size))

    # Roads: straight grey strips of ground, similar in colour to grey roofs.
    for _ in range(rng.integers(0, 2)):
        angle = rng.uniform(0, np.pi)
        road, _, _ = _rotated_rect(yy, xx, rng.uniform(0, size), rng.uniform(0, size), rng.uniform(1.5, 3) * scale, 2 * size, angle)
        grey = rng.uniform(0.45, 0.65)
        _paint(image, road, np.array([grey, grey, grey * 1.02]), 1 + 0.04 * rng.standard_normal((size, size)))

    # Water: a river (a thick sine-bent curve across the scene) and/or ponds.
    water = np.zeros((size, size), bool)
    if rng.random() < 0.6:
        horizontal = rng.random() < 0.5
        along, across = (xx, yy) if horizontal else (yy, xx)
        centre = rng.uniform(0.2, 0.8) * size + rng.uniform(3, 10) * scale * np.sin(
            along / size * rng.uniform(1, 3) * np.pi + rng.uniform(0, 2 * np.pi)
        )
        water |= np.abs(across - centre) <= rng.uniform(3, 7) * scale
    for _ in range(rng.integers(0, 3)):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(4, 10, 2) * scale
        water |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    water_colour = np.array([0.15, 0.30, 0.45]) + rng.normal(0, 0.05, 3)
    ripples = 1 + 0.08 * np.sin((xx * rng.uniform(0.5, 1) + yy * rng.uniform(0.5, 1)) / scale + rng.uniform(0, 6))
    _paint(image, water, water_colour, ripples)
    mask[water] = 3

    # Buildings: rotated rectangles with a ridge, each casting a dark shadow onto the ground.
    roofs = np.array([[0.65, 0.25, 0.2], [0.6, 0.6, 0.62], [0.85, 0.85, 0.82], [0.45, 0.3, 0.22], [0.35, 0.45, 0.6]])
    shadow_dir = rng.uniform(0, 2 * np.pi)
    for _ in range(rng.integers(1, 5)):
        cy, cx = rng.uniform(0.1, 0.9, 2) * size
        half_h, half_w = rng.uniform(3.5, 8, 2) * scale
        angle = rng.uniform(0, np.pi)
        sy, sx = 2.5 * scale * np.sin(shadow_dir), 2.5 * scale * np.cos(shadow_dir)
        shadow, _, _ = _rotated_rect(yy, xx, cy + sy, cx + sx, half_h, half_w, angle)
        shadow &= mask != 1  # shadows darken ground and water, never another roof
        image[:, shadow] *= 0.45
        body, inside, v = _rotated_rect(yy, xx, cy, cx, half_h, half_w, angle)
        colour = roofs[rng.integers(len(roofs))] * rng.uniform(0.85, 1.15)
        # two roof halves split by the ridge, and darker eaves along the outline
        shading = np.where(v > 0, 1.0, 0.72) * np.where(inside < scale, 0.65, 1.0)
        _paint(image, body, colour, shading * (1 + 0.03 * rng.standard_normal((size, size))))
        mask[body] = 1

    # Trees: clusters of round crowns, shaded from rim to top, over everything else.
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0, size, 2)
        spread = rng.uniform(3, 9) * scale
        green = np.array([0.18, 0.38, 0.14]) + rng.normal(0, 0.04, 3)
        for _ in range(rng.integers(3, 10)):
            by, bx = cy + rng.normal(0, spread), cx + rng.normal(0, spread)
            r = rng.uniform(2, 4.5) * scale
            d2 = ((yy - by) ** 2 + (xx - bx) ** 2) / r**2
            crown = d2 <= 1
            shade = (1.15 - 0.5 * d2) * (1 + 0.12 * rng.standard_normal((size, size)))
            _paint(image, crown, green, shade)
            mask[crown] = 2

    # The whole scene: brightness, contrast and tint per image, then sensor noise.
    mean = image.mean()
    image = (image - mean) * rng.uniform(0.75, 1.25) + mean * rng.uniform(0.75, 1.2)
    image *= 1 + rng.normal(0, 0.06, 3)[:, None, None]
    image += rng.normal(0, 0.03, image.shape)
    return np.clip(image, 0, 1).astype(np.float32), mask


class SyntheticScenes(Dataset):
    """``n`` seeded aerial-style scenes of ``size`` x ``size`` pixels (see the module docstring)."""

    classes = CLASSES
    num_classes = len(CLASSES)
    in_channels = 3
    uniform_size = True

    def __init__(self, n: int, size: int = 64, seed: int = 0):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if size < 8:
            raise ValueError(f"size must be >= 8 pixels, got {size}")
        self.n, self.size, self.seed = int(n), int(size), int(seed)

    def __len__(self):
        return self.n

    def __getitem__(self, index: int):
        if not 0 <= index < self.n:
            raise IndexError(f"scene index {index} out of range for {self.n} scenes")
        return make_scene(np.random.default_rng([self.seed, index]), self.size)
