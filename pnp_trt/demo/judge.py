"""Edits of synthetic scenes and how their results are judged: the world is drawn by a program, so the ideal
result of every edit (each shape's mask and colour) is known, and a result is scored against it by colour
segmentation. Pure numpy: the quality benchmark and the quality tests share it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from . import world


@dataclass(frozen=True)
class Edit:
    guidance: world.Scene
    target: world.Scene
    """The ideal result: the guidance's layout with the edit applied."""
    kind: str
    """colour | background | shape: what the edit changes."""

    @property
    def prompt(self) -> str:
        return self.target.caption()


@dataclass(frozen=True)
class Score:
    structure: float
    """IoU of the result's shapes (pixels not of its own background's colour, whichever that is) with the ideal
    result's: the layout kept, apart from whether the colours follow the prompt."""
    faithful: bool
    """Every shape has its target colour (and kind, where the edit changes it) and the background its colour."""


EDIT_KINDS = ("colour", "background", "shape")


def edits(count: int, seed: int = 2026) -> list[Edit]:
    """`count` fixed edits, the three kinds in turn (the same list on every machine: numpy's seeded PCG64)."""
    rng = np.random.default_rng(seed)
    return [_edit(world.random_scene(rng), EDIT_KINDS[i % 3], rng) for i in range(count)]


def _edit(scene: world.Scene, kind: str, rng: np.random.Generator) -> Edit:
    used = {scene.background, *(s.colour for s in scene.shapes)}
    free = [c for c in world.PALETTE if c not in used]
    if kind == "background":
        return Edit(scene, scene.recoloured(background=str(rng.choice(free))), kind)
    if kind == "colour":
        spare = [c for c in world.PALETTE if c != scene.background]
        colours = tuple(str(c) for c in rng.choice(spare, size=len(scene.shapes), replace=False))
        while any(c == s.colour for c, s in zip(colours, scene.shapes, strict=True)):
            colours = tuple(str(c) for c in rng.choice(spare, size=len(scene.shapes), replace=False))
        return Edit(scene, scene.recoloured(colours=colours), kind)
    first = scene.shapes[0]
    other = str(rng.choice([k for k in world.SHAPES if k != first.kind]))
    return Edit(scene, world.Scene(scene.background, (replace(first, kind=other), *scene.shapes[1:])), kind)


def judge(edit: Edit, image: np.ndarray) -> Score:
    """Score a result (uint8 [SIZE, SIZE, 3]) against the edit's ideal result."""
    labels = world.nearest_colours(image)
    target = edit.target
    masks = [s.mask() for s in target.shapes]
    ideal = np.logical_or.reduce(masks)
    background = _majority(labels[~ideal])
    shapes = labels != background
    structure = float((shapes & ideal).sum() / max(1, (shapes | ideal).sum()))
    faithful = background == world.colour_index(target.background) and all(
        _majority(labels[m]) == world.colour_index(s.colour) for s, m in zip(target.shapes, masks, strict=True))
    if edit.kind == "shape":
        faithful = faithful and _kind_of(labels, target.shapes[0]) == target.shapes[0].kind
    return Score(structure, bool(faithful))


def _majority(labels: np.ndarray) -> int:
    return int(np.bincount(labels.ravel(), minlength=len(world.PALETTE)).argmax())


def _kind_of(labels: np.ndarray, shape: world.Shape) -> str:
    """The kind whose ideal mask (same centre and size) best matches the pixels of the shape's colour near it."""
    rows, cols = np.mgrid[0:world.SIZE, 0:world.SIZE] + 0.5
    near = np.hypot(rows - shape.centre[0], cols - shape.centre[1]) <= shape.radius * 1.4
    drawn = (labels == world.colour_index(shape.colour)) & near
    ious = {kind: (drawn & (m := replace(shape, kind=kind).mask())).sum() / max(1, (drawn | m).sum())
            for kind in world.SHAPES}
    return max(ious, key=lambda kind: ious[kind])


def summary(scores: list[Score]) -> dict[str, float]:
    """Mean structure IoU and the share of faithful results."""
    return {"structure": float(np.mean([s.structure for s in scores])),
            "fidelity": float(np.mean([s.faithful for s in scores]))}
