"""Optimization profiles derived from the I/O contract (pure Python: unit-tested without TensorRT).

The user gives the prompt batch (target prompts per injection batch) to optimize for and the largest, and a
range of image sizes; each graph's batch follows from how the sampler calls it: the text encoder sees 1..N
prompts, the VAE encoder one image, the decoder 1..N latents (the last batch may be partial), the UNet 1
(inversion, the last capture) or 2 to 2N samples (a capture riding along the inversion; negative + target
branches) — two UNet profiles, so batch-1 calls run on kernels tuned for batch 1.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

from ..contract import GraphSpec, ModelDims, axis_sizes
from ..errors import PnPError

Shape = tuple[int, ...]
Profile = dict[str, tuple[Shape, Shape, Shape]]
"""(min, opt, max) shape per dynamic input of one graph."""


@dataclass(frozen=True)
class BuildShapes:
    """The prompt batches and image sizes (pixels, H×W) an engine must accept."""

    opt_batch: int = 1
    max_batch: int = 4
    min_size: tuple[int, int] = (256, 256)
    opt_size: tuple[int, int] = (512, 512)
    max_size: tuple[int, int] = (768, 768)

    def check(self, multiple: int) -> BuildShapes:
        if not 1 <= self.opt_batch <= self.max_batch:
            raise PnPError(f"batches must satisfy 1 ≤ opt ≤ max, got {self.opt_batch}/{self.max_batch}")
        for axis in (0, 1):
            lo, opt, hi = self.min_size[axis], self.opt_size[axis], self.max_size[axis]
            if not lo <= opt <= hi:
                raise PnPError(f"sizes must satisfy min ≤ opt ≤ max on each side, got {self.min_size}/"
                               f"{self.opt_size}/{self.max_size}")
        for size in (self.min_size, self.opt_size, self.max_size):
            if any(side % multiple or side < multiple for side in size):
                raise PnPError(f"image size {size[0]}x{size[1]} is not a multiple of {multiple}; "
                               f"use sides that are multiples of {multiple}")
        return self

    @classmethod
    def around(cls, native: int, multiple: int, opt_batch: int = 1, max_batch: int = 4) -> BuildShapes:
        """A model family's default range: optimized for its native square (SD 2.1-base 512², SDXL 1024²), from
        half that to one and a half times it (256²-768² and 512²-1536²), in multiples of `multiple`."""
        def side(scale: float) -> int:
            return max(multiple, round(native * scale / multiple) * multiple)
        return cls(opt_batch, max_batch, (side(0.5),) * 2, (side(1.0),) * 2, (side(1.5),) * 2)

    @classmethod
    def static(cls, size: tuple[int, int], batch: int = 1) -> BuildShapes:
        """One size and prompt batch: each profile static in size, its batch range as tight as the sampler's
        calls allow (the UNet: 1, and 2 to 2·batch)."""
        return cls(batch, batch, size, size, size)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildShapes:
        return cls(int(data["opt_batch"]), int(data["max_batch"]),
                   parse_pair(data["min_size"]), parse_pair(data["opt_size"]), parse_pair(data["max_size"]))


def parse_pair(value: Any) -> tuple[int, int]:
    height, width = value
    return int(height), int(width)


def parse_size(text: str) -> tuple[int, int]:
    """'512x768' → (512, 768) as height × width."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not match:
        raise PnPError(f"size {text!r} is not HEIGHTxWIDTH (e.g. 512x512)")
    return int(match.group(1)), int(match.group(2))


def graph_batch(graph: str, prompt_batch: int) -> int:
    """The batch a graph runs at when the sampler injects `prompt_batch` prompts at once."""
    return {"text_encoder": prompt_batch, "vae_encoder": 1, "vae_decoder": prompt_batch,
            "unet": 2 * prompt_batch}[graph]


def profile_batches(graph: str, shapes: BuildShapes) -> list[tuple[int, int, int]]:
    """(min, opt, max) batch of each optimization profile. The UNet has two: batch 1 (the inversion calls
    that carry no capture, the last capture) on kernels tuned for it, and 2..2N (captures riding along the
    inversion, injection); every other graph one, from batch 1."""
    opt, high = graph_batch(graph, shapes.opt_batch), graph_batch(graph, shapes.max_batch)
    if graph == "unet":
        return [(1, 1, 1), (2, opt, high)]
    return [(1, opt, high)]


def profile_index(graph: str, batch: int) -> int:
    """Which of `profile_batches` a call of this batch runs on."""
    return 1 if graph == "unet" and batch > 1 else 0


def profile_shapes(spec: GraphSpec, dims: ModelDims, shapes: BuildShapes) -> list[Profile]:
    """(min, opt, max) shape of every input whose shape can vary, for each optimization profile."""
    profiles = []
    for low_batch, opt_batch, high_batch in profile_batches(spec.name, shapes):
        low = axis_sizes(dims, low_batch, *shapes.min_size)
        opt = axis_sizes(dims, opt_batch, *shapes.opt_size)
        high = axis_sizes(dims, high_batch, *shapes.max_size)
        profiles.append({t.name: (t.shape(low), t.shape(opt), t.shape(high))
                         for t in spec.inputs if any(isinstance(a, str) for a in t.axes)})
    return profiles


def check_request(graph: str, shapes: BuildShapes, batch: int, size: tuple[int, int] | None, rebuild: str) -> None:
    """A run outside the built profiles → one line naming what is out of range and how to rebuild.
    `size` is the image size (H, W) the call works at; None for graphs whose shapes ignore it."""
    hi_batch = graph_batch(graph, shapes.max_batch)
    if not 1 <= batch <= hi_batch:
        raise PnPError(f"the {graph} engine was built for batch 1..{hi_batch}, asked {batch}; lower "
                       f"--prompt-batch-size or rebuild with a larger --max-batch (`{rebuild}`)")
    if size is None:
        return
    height, width = size
    if not (shapes.min_size[0] <= height <= shapes.max_size[0] and shapes.min_size[1] <= width <= shapes.max_size[1]):
        raise PnPError(f"the engines were built for {shapes.min_size[0]}x{shapes.min_size[1]} to "
                       f"{shapes.max_size[0]}x{shapes.max_size[1]}, asked {height}x{width}; pass --height/--width "
                       f"in range or rebuild with --min-size/--max-size (`{rebuild}`)")
