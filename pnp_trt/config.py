"""Settings of one translation, validated on construction (DESIGN §1 gives their meaning)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from .contract import SDXL_SIZE_MULTIPLE, SIZE_MULTIPLE
from .errors import PnPError
from .validation import integer, number, text

DEFAULT_NEGATIVE_PROMPT = "ugly, blurry, black, low res, unrealistic"
BACKENDS = ("torch", "onnxruntime", "tensorrt")
MAX_GUIDANCE_SCALE = 1000.0
"""|s| beyond this only overflows: the paper uses 7.5, and 1e308 turned every image black."""
DEFAULT_CACHE_BYTES = 2 << 30
"""What the in-memory source cache may hold."""
DEFAULT_DISK_CACHE_BYTES = 16 << 30
"""What an on-disk source cache (`--cache-dir`) may hold."""


FLAG = re.compile(r"--([a-z][a-z-]*)")

GENERATION_SETTINGS = ("seed", "source_guidance_scale")
"""Settings that act only on a guidance generated from a source prompt: given with an image they would do nothing,
and every surface refuses them there."""
GENERATION_ONLY = "applies with a source prompt (an image's inversion has no noise to seed); leave it out"
"""What every surface says of a `GENERATION_SETTINGS` setting given with an image."""


@dataclass(frozen=True)
class TranslateConfig:
    steps: int = 50
    """Sampling (DDIM) steps."""
    inversion_steps: int | None = None
    """DDIM inversion steps; None = `steps`. The paper's preprocessing uses 999."""
    inversion_prompt: str = ""
    """Prompt the guidance image is inverted with."""
    guidance_scale: float = 7.5
    """Classifier-free guidance scale s of the translation."""
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    """Unconditional branch of the guidance (the paper's default)."""
    feature_injection: float = 0.8
    """τ_f: the ResBlock feature is injected for the first int(steps·τ_f) steps."""
    attention_injection: float = 0.5
    """τ_A: self-attention q/k are injected for the first int(steps·τ_A) steps."""
    seed: int = 0
    """Seed of the Gaussian noise generated guidance starts from (real images need none)."""
    height: int | None = None
    """Output height in pixels; None keeps the aspect ratio with the model's native short side (SD 2.1-base: 512)."""
    width: int | None = None
    """Output width in pixels; None keeps the aspect ratio with the model's native short side (SD 2.1-base: 512)."""
    source_guidance_scale: float = 7.5
    """Guidance scale used to generate the guidance image from a source prompt."""
    prompt_batch_size: int | None = None
    """How many target prompts share one injection batch (each adds 2 UNet samples per step);
    None: chosen from free device memory (4 on the CPU). Results do not depend on it."""

    def __post_init__(self) -> None:
        """Every field typed and bounded (`validation`), whichever surface built the config."""
        integer("--steps", self.steps, 1)
        if self.inversion_steps is not None:
            integer("--inversion-steps", self.inversion_steps, 1)
        text("--inversion-prompt", self.inversion_prompt)
        text("--negative-prompt", self.negative_prompt)
        for flag, tau in (("--feature-injection", self.feature_injection),
                          ("--attention-injection", self.attention_injection)):
            number(flag, tau, 0.0, 1.0)
        for flag, size in (("--height", self.height), ("--width", self.width)):
            if size is not None and (integer(flag, size) < SIZE_MULTIPLE or size % SDXL_SIZE_MULTIPLE):
                raise PnPError(f"{flag} must be a multiple of {SIZE_MULTIPLE} (SD 1.x/2.x; {SDXL_SIZE_MULTIPLE} for "
                               f"SDXL) and at least {SIZE_MULTIPLE}, got {size}")
        for flag, scale in (("--guidance-scale", self.guidance_scale),
                            ("--source-guidance-scale", self.source_guidance_scale)):
            number(flag, scale, -MAX_GUIDANCE_SCALE, MAX_GUIDANCE_SCALE)
        integer("--seed", self.seed, 0, 2**32 - 1)
        if self.prompt_batch_size is not None:
            integer("--prompt-batch-size", self.prompt_batch_size, 1, 1024)
        for field in fields(self):  # numpy scalars (accepted above) as plain numbers: records are JSON
            value = getattr(self, field.name)
            if isinstance(value, np.generic):
                object.__setattr__(self, field.name, value.item())

    @classmethod
    def field_wording(cls, message: str) -> str:
        """A settings refusal as a server's client or an API caller reads it: each flag by its setting's name
        (`--steps` → `steps`), the names a form and the API use."""
        return in_keywords(message, {f.name.replace("_", "-"): f.name for f in fields(cls)})

    @classmethod
    def of(cls, settings: Mapping[str, Any]) -> TranslateConfig:
        """From keyword settings (the API's `**settings`), an unknown name refused in one line; refusals name
        the keywords (`steps`), not the CLI's flags."""
        unknown = sorted(set(settings) - {f.name for f in fields(cls)})
        if unknown:
            raise PnPError(f"unknown setting(s) {', '.join(map(repr, unknown))}; the settings are "
                           f"{', '.join(f.name for f in fields(cls))}")
        try:
            return cls(**settings)
        except PnPError as exc:
            raise PnPError(cls.field_wording(str(exc))) from None

    @property
    def effective_inversion_steps(self) -> int:
        return self.inversion_steps or self.steps

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Limits:
    """What one translation may ask for, whatever its settings: the CLI's flags, the API's and a server's
    guard against requests that would exhaust memory (DESIGN §1 sizes: activations grow with pixels²
    in attention)."""

    max_output_pixels: int | None = None
    """Largest output image (height × width); None: the model's default, `default_output_pixels`."""
    over_hint: str = "pass a smaller height/width (or a larger Limits(max_output_pixels=...) if the machine has " \
                     "the memory)"
    """What a refusal tells its reader to do (the API's words; the CLI's are `CLI_OVER_HINT`): a CLI or API user
    can raise the limit, a server's client cannot."""

    def output_pixels(self, native: int) -> int:
        return self.max_output_pixels if self.max_output_pixels is not None else default_output_pixels(native)

    def check_output(self, height: int, width: int, native: int = 512) -> None:
        """Refuse an output over the limit for a model of this native side (the default limit follows it)."""
        limit = self.output_pixels(native)
        if height * width > limit:
            raise PnPError(f"output {height}x{width} is {height * width / 1e6:.3g} Mpx, over the "
                           f"{limit / 1e6:.3g} Mpx limit; {self.over_hint}")


def in_keywords(message: str, words: Mapping[str, str]) -> str:
    """A refusal worded for the CLI as another surface reads it: each `--flag` in `words` as its word there,
    except inside `command` quotes (a command to run keeps its flags)."""
    parts = message.split("`")
    for index in range(0, len(parts), 2):
        parts[index] = FLAG.sub(lambda m: words.get(m[1], m[0]), parts[index])
    return "`".join(parts)


CLI_OVER_HINT = "pass a smaller --height/--width (or raise --max-output-mpx if the machine has the memory)"


def default_output_pixels(native: int) -> int:
    """The default output limit: 1024² (SD 2.1-base's native 512² edits up to twice its side), or the model's
    native side × 1.5 squared where that is more (SDXL: 1536², so a 2:3 guidance keeps its 1024 short side)."""
    return max(1024 * 1024, int(1.5 * native) ** 2)


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise PnPError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name
