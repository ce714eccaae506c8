"""One translation end to end: guidance (image or source prompt) + target prompts → images."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .. import validation
from ..config import Limits, TranslateConfig
from ..contract import array_precision, axis_sizes, captured_name, graph_specs
from ..destination import api_words
from ..engines.buffers import auto_prompt_batch
from ..errors import PnPError
from ..fileio import writing
from ..images import Guidance, check_guidance, output_size, to_array, to_pil
from ..results import save_directory, save_file, versions
from .backend import LoadedModel
from .cache import SourceCache, source_key
from .sampler import InjectionPlan, Progress, Sampler, Source, Stats, no_progress, prepare_source, sample_targets

GUIDANCE_FILE = "guidance.png"
"""Where `Translation.save` puts a generated guidance it decoded."""


@dataclass(frozen=True)
class Translation:
    """What one translation returns: the images (one per prompt, in order), the final latents, how the work
    went, and `save(directory)` for the PNGs plus a `translate.json` record."""

    images: list[Image.Image]
    latents: np.ndarray
    """Final latents [N,4,h,w] before decoding (what the parity tests compare)."""
    stats: Stats
    size: tuple[int, int]
    source_cache_hit: bool
    """The source branch (inversion/generation + capture) came from the cache: no UNet calls for it."""
    prompts: list[str]
    settings: TranslateConfig
    backend: str
    model: str
    source_prompt: str | None = None
    guidance_file: str | None = None
    """The guidance image's path, when it came from a file (recorded, never read again)."""
    guidance_image: Image.Image | None = None
    """A generated guidance, decoded when asked for (`decode_guidance`)."""

    @property
    def timings_s(self) -> dict[str, float]:
        """Seconds per stage."""
        return self.stats.timings

    @property
    def unet_evaluations(self) -> int:
        return self.stats.unet_evaluations

    @property
    def unet_calls(self) -> int:
        """Sequential UNet invocations (the critical path on a GPU)."""
        return self.stats.unet_calls

    @property
    def record(self) -> dict[str, Any]:
        """What `translate.json` holds: inputs, settings, model, timings and the software that made it."""
        return {"prompts": self.prompts, "image": self.guidance_file, "source_prompt": self.source_prompt,
                "backend": self.backend, "model": self.model, "size": list(self.size),
                "settings": self.settings.to_dict(), "timings_s": self.timings_s,
                "unet_evaluations": self.unet_evaluations, "unet_calls": self.unet_calls,
                "source_cache_hit": self.source_cache_hit, "versions": versions()}

    def save(self, directory: Path | str) -> list[Path]:
        """One PNG per prompt plus `translate.json` in `directory`, all or nothing (a previous run's results
        there are replaced as one set; a directory holding anything else is refused); returns the image paths."""
        directory = validation.path("save's directory", directory)
        with api_words("save's directory"):
            return self._save_directory(Path(directory))

    def save_image(self, path: Path | str, overwrite: bool = False) -> Path:
        """A one-prompt translation as one PNG whose `pnp-trt` text chunk holds the record (a decoded generated
        guidance goes beside it as NAME.guidance.png), all or nothing. An existing file is replaced only if
        pnp-trt wrote it, or with `overwrite` (never the guidance image itself)."""
        if len(self.images) != 1:
            raise PnPError(f"save_image writes one image and this translation has {len(self.images)}; use save(DIR)")
        checked = validation.path("save_image's path", path)
        overwrite = validation.boolean("overwrite", overwrite)
        with api_words("save_image's path"):  # a str as given: its final / (a directory's name) is refused
            return self._save_file(path if isinstance(path, str) else checked, overwrite)

    def write(self, out: Path, overwrite: bool = False) -> list[Path]:
        """What `pnp-trt translate --out` writes: `save` for several prompts, `save_image` for one, its refusals
        in the CLI's words (`--out`, `--overwrite`)."""
        return self._save_directory(out) if len(self.images) > 1 else [self._save_file(out, overwrite)]

    def _save_directory(self, directory: Path) -> list[Path]:
        extra = {GUIDANCE_FILE: self.guidance_image} if self.guidance_image is not None else {}
        with writing(directory):
            return save_directory(directory, self.prompts, self.images, self.record, extra, inputs=self._inputs())

    def _save_file(self, path: Path | str, overwrite: bool) -> Path:
        with writing(Path(path)):
            return save_file(path, self.images[0], self.record, self.guidance_image, overwrite,
                             inputs=self._inputs())

    def _inputs(self) -> list[str]:
        return [self.guidance_file] if self.guidance_file else []




def checked_progress(progress: Progress) -> Progress:
    """`progress` as given, checked: a function of (stage, total) returning the advance() called per step."""
    try:
        inspect.signature(progress).bind("stage", 1)
    except TypeError:
        raise PnPError(f"progress must be a function progress(stage, total) -> advance(), got "
                       f"{getattr(progress, '__name__', type(progress).__name__)}") from None
    except ValueError:  # a builtin without a signature: taken on trust
        pass

    def checked(stage: str, total: int) -> Callable[[], None]:
        advance = progress(stage, total)
        if not callable(advance):
            raise PnPError(f"progress(stage, total) must return a function advance() (called once per step), "
                           f"got {type(advance).__name__}")
        return advance
    return checked


def plan_size(model: LoadedModel, config: TranslateConfig, image: Image.Image | None) -> tuple[int, int]:
    multiple, native = model.dims.size_multiple, model.dims.native_size
    for flag, side in (("--height", config.height), ("--width", config.width)):
        if side is not None and side % multiple:
            below = side // multiple * multiple
            choices = f"{below} or {below + multiple}" if below else str(multiple)
            raise PnPError(f"{flag} {side} is not a multiple of {multiple}, which {model.dims.model_family.about} "
                           f"models need: give {choices}")
    if image is None:
        return config.height or native, config.width or native
    return output_size(image.width, image.height, config.height, config.width, multiple, native)


def source_fits(model: LoadedModel, config: TranslateConfig, size: tuple[int, int]) -> Callable[[Source], bool]:
    """Whether a stored source has exactly what this translation injects: the start latent's shape, one
    entry per capture step with that step's points, each of the contract's shape."""
    spec = graph_specs(model.dims)["unet"]
    sizes = axis_sizes(model.dims, 1, *size)
    start = spec.inputs[0].shape(sizes)
    shapes = {p.name: tensor.shape(sizes) for p in model.dims.points for tensor in spec.outputs
              if tensor.name == captured_name(p)}
    plan = InjectionPlan.of(config, model.dims.points)

    def fits(source: Source) -> bool:
        if tuple(source.start.shape) != start or len(source.captured) != plan.capture_steps:
            return False
        return all(set(step) == {p.name for p in plan.points_at(i)}
                   and all(tuple(a.shape) == shapes[name] for name, a in step.items())
                   for i, step in enumerate(source.captured))
    return fits


def prompt_batch(model: LoadedModel, source: Source, requested: int | None = None) -> int:
    """Prompts per injection batch: as requested, else what the backend's free memory holds at this size;
    never more than the backend runs (a TensorRT engine's profile). Results do not depend on it."""
    chosen = requested or memory_prompt_batch(model, source)
    limit = model.backend.max_prompt_batch
    return min(chosen, limit) if limit else chosen


def memory_prompt_batch(model: LoadedModel, source: Source) -> int:
    """What half the backend's free memory holds at this size (`auto_prompt_batch`)."""
    _, _, latent_h, latent_w = source.start.shape
    factor = model.dims.vae_factor
    precision = array_precision(source.start)
    return auto_prompt_batch(model.backend.free_memory(), model.dims, latent_h * factor, latent_w * factor,
                             precision)


def translate(model: LoadedModel, prompts: Sequence[str] | str, config: TranslateConfig | None = None,
              image: Guidance | Image.Image | Path | str | bytes | np.ndarray | None = None,
              source_prompt: str | None = None, progress: Progress = no_progress, cache: SourceCache | None = None,
              limits: Limits | None = None, decode_guidance: bool = False, **settings: Any) -> Translation:
    """Translate a guidance image (or one generated from `source_prompt`) into each target prompt. `image`:
    what `images.check_guidance` takes (a path, PIL image, image file bytes, uint8 array or a checked
    `Guidance`, whose file the record names). The settings come as `config` or as `TranslateConfig`'s
    keywords (`steps=20`), whose misspelling is refused in one line that lists them.

    With a `cache`, the source branch is looked up first and stored after: later calls on the same
    guidance and settings run only the injection passes, whatever their prompts. On a GPU the whole call
    runs on the calling thread's own stream.
    """
    if not isinstance(model, LoadedModel):
        raise PnPError(f"model must be a loaded model (`pnp_trt.open_model(...)`, or use `Translator.open`), got "
                       f"{type(model).__name__}")
    if config is not None and not isinstance(config, TranslateConfig):
        raise PnPError(f"config must be a pnp_trt.TranslateConfig (e.g. TranslateConfig(steps=20)), got "
                       f"{type(config).__name__}")
    if config is not None and settings:
        raise PnPError(f"give the settings as config or as keywords ({next(iter(settings))}=...), not both")
    if cache is not None and not isinstance(cache, SourceCache):
        raise PnPError(f"cache must be a pnp_trt.SourceCache (e.g. SourceCache(directory=...)), got "
                       f"{type(cache).__name__}")
    if limits is not None and not isinstance(limits, Limits):
        raise PnPError(f"limits must be a pnp_trt.config.Limits, got {type(limits).__name__}")
    if (image is None) == (source_prompt is None):
        raise PnPError("give exactly one guidance: an image or a source prompt")
    prompts = validation.prompts(prompts)
    progress = checked_progress(progress)
    if validation.boolean("decode_guidance", decode_guidance) and image is not None:
        raise PnPError("decode_guidance decodes a guidance generated from a source prompt; an image is its own "
                       "guidance: leave decode_guidance out")
    if source_prompt is not None:
        validation.text("the source prompt", source_prompt, non_blank=True)
    config = config or TranslateConfig.of(settings)
    guidance = check_guidance(image) if image is not None else None
    image = guidance.image if guidance is not None else None
    size = plan_size(model, config, image)
    (limits or Limits()).check_output(*size, model.dims.native_size)
    pixels = to_array(image, size) if image is not None else None
    with model.backend.worker_stream():  # every array of this call is made and used on this stream
        sampler = Sampler(model, progress=progress, size=size)

        def build() -> Source:
            source = prepare_source(sampler, config, size, pixels, source_prompt)
            model.backend.synchronize()  # complete before another thread's stream reads it from the cache
            return source

        if cache is None:
            source, hit = build(), False
        else:
            key = source_key(model.identity, config, size, pixels, source_prompt,
                             f"{model.dims.family}/{model.dims.preset}")
            source, hit = cache.get_or_build(key, model.backend, build, source_fits(model, config, size))
        per_batch = prompt_batch(model, source, config.prompt_batch_size)
        decoded, latents = sample_targets(sampler, source, prompts, config, per_batch)
        if not (np.isfinite(latents).all() and all(np.isfinite(image).all() for image in decoded)):
            raise PnPError("the model produced NaN or infinite values (damaged weights, or an fp16 overflow): "
                           "nothing was written; check the model's weights (`pnp-trt verify` for an export)")
        images = [to_pil(image) for image in decoded]
        guidance_image = None
        if decode_guidance and source.guidance is not None:
            with sampler.stats.stage("decode"):
                guidance_image = to_pil(sampler.decode(source.guidance)[0])
    return Translation(images, latents, sampler.stats, size, hit, prompts, config, model.backend.name,
                       model.identity, source_prompt, guidance.file if guidance else None, guidance_image)
