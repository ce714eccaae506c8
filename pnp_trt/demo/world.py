"""The demo model's synthetic world: one or two flat shapes of named colours on a coloured background, drawn and
captioned by this program, so the truth of every picture (each shape's mask and colour) is known exactly.

Pure numpy: the trainer, the quality benchmark and the tests all draw and judge scenes with it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

SIZE = 128
"""Scenes are SIZE × SIZE RGB pictures (16 × 16 latents through the SD VAE's factor 8)."""

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 215, 40), "white": (240, 240, 240), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
WORDS = sorted({"a", "and", "on", "background", *PALETTE, *SHAPES})
"""Every word a caption uses (the demo tokenizer gives each one token)."""


@dataclass(frozen=True)
class Shape:
    kind: str
    colour: str
    centre: tuple[float, float]
    """(row, column) in pixels."""
    radius: float

    def mask(self, size: int = SIZE) -> np.ndarray:
        """Boolean [size, size] mask of the pixels the shape covers."""
        rows, cols = np.mgrid[0:size, 0:size] + 0.5
        dy, dx = rows - self.centre[0], cols - self.centre[1]
        if self.kind == "circle":
            return dy ** 2 + dx ** 2 <= self.radius ** 2
        if self.kind == "square":
            half = self.radius * 0.85
            return (np.abs(dy) <= half) & (np.abs(dx) <= half)
        # an upright triangle: apex above the centre, base below it
        top, bottom = -self.radius, self.radius * 0.8
        width = (dy - top) / (bottom - top) * self.radius
        return (dy >= top) & (dy <= bottom) & (np.abs(dx) <= width)


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]

    def caption(self) -> str:
        things = " and ".join(f"a {s.colour} {s.kind}" for s in self.shapes)
        return f"{things} on a {self.background} background"

    def draw(self) -> np.ndarray:
        """uint8 [SIZE, SIZE, 3]."""
        image = np.empty((SIZE, SIZE, 3), np.uint8)
        image[:] = PALETTE[self.background]
        for shape in self.shapes:
            image[shape.mask()] = PALETTE[shape.colour]
        return image

    def recoloured(self, colours: tuple[str, ...] | None = None, background: str | None = None,
                   kinds: tuple[str, ...] | None = None) -> Scene:
        """The same layout with other colours, background or shape kinds (a target of an edit)."""
        shapes = tuple(replace(s, colour=(colours or [s.colour] * len(self.shapes))[i],
                               kind=(kinds or [s.kind] * len(self.shapes))[i]) for i, s in enumerate(self.shapes))
        return Scene(background or self.background, shapes)


def random_scene(rng: np.random.Generator, max_shapes: int = 2) -> Scene:
    """A scene of 1..max_shapes non-overlapping shapes, each colour different from the background's and from
    one another."""
    names = list(PALETTE)
    background = names[rng.integers(len(names))]
    count = int(rng.integers(1, max_shapes + 1))
    colours = rng.choice([n for n in names if n != background], size=count, replace=False)
    shapes: list[Shape] = []
    while len(shapes) < count:
        radius = float(rng.uniform(16, 30) if count == 1 else rng.uniform(13, 22))
        centre = (float(rng.uniform(radius + 2, SIZE - radius - 2)), float(rng.uniform(radius + 2, SIZE - radius - 2)))
        if all(np.hypot(centre[0] - s.centre[0], centre[1] - s.centre[1]) > radius + s.radius + 4 for s in shapes):
            shapes.append(Shape(SHAPES[rng.integers(len(SHAPES))], str(colours[len(shapes)]), centre, radius))
    return Scene(background, tuple(shapes))


def nearest_colours(image: np.ndarray) -> np.ndarray:
    """Per pixel, the index into PALETTE of the nearest named colour (the segmentation the benchmark judges by)."""
    palette = np.array(list(PALETTE.values()), np.float32)
    distances = ((image[:, :, None, :].astype(np.float32) - palette) ** 2).sum(-1)
    return distances.argmin(-1)


def colour_index(name: str) -> int:
    return list(PALETTE).index(name)
