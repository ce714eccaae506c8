"""One translation end to end: guidance (image or source prompt) + target prompts → images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..config import TranslateConfig
from ..errors import PnPError
from ..images import output_size, to_array, to_pil
from ..schedule import inversion_timesteps, sampling_timesteps
from .backend import Array, LoadedModel
from .sampler import Captured, InjectionPlan, Progress, Sampler, Stats, no_progress


@dataclass
class Source:
    """What the target prompts are sampled against: the start latent x_T and the captured tensors."""

    start: Array
    captured: Captured


@dataclass
class TranslateResult:
    images: list[Image.Image]
    latents: np.ndarray
    """Final latents [N,4,h,w] before decoding (what the parity tests compare)."""
    stats: Stats
    size: tuple[int, int]


def plan_size(model: LoadedModel, config: TranslateConfig, image: Image.Image | None) -> tuple[int, int]:
    multiple = model.dims.size_multiple
    if image is None:
        return config.height or 512, config.width or 512
    return output_size(image.width, image.height, config.height, config.width, multiple)


def prepare_source(sampler: Sampler, config: TranslateConfig, size: tuple[int, int],
                   image: Image.Image | None, source_prompt: str | None) -> Source:
    """Invert the image (or generate from the source prompt), then capture what injection needs."""
    model, stats = sampler.model, sampler.stats
    ts = sampling_timesteps(model.schedule, config.steps)
    plan = InjectionPlan.from_taus(config.steps, config.feature_injection, config.attention_injection)
    with stats.stage("text"):
        empty = sampler.encode_prompts([""])
    if image is not None:
        inv_ts = inversion_timesteps(model.schedule, config.steps, config.effective_inversion_steps)
        with stats.stage("encode"):
            z0 = sampler.encode_image(to_array(image, size))
        with stats.stage("text"):
            inv_emb = empty if not config.inversion_prompt else sampler.encode_prompts([config.inversion_prompt])
        with stats.stage("invert"):
            src = sampler.invert(z0, inv_emb, inv_ts, ts)
    else:
        noise = sampler.backend.asarray(start_noise(model, size, config.seed))
        with stats.stage("text"):
            cond = sampler.encode_prompts([source_prompt or ""])
        with stats.stage("generate"):
            src = sampler.generate_source(noise, cond, empty, config.source_guidance_scale, ts)
    with stats.stage("capture"):
        captured = sampler.capture(src, empty, ts, plan)
    return Source(src[ts[0]], captured)


def start_noise(model: LoadedModel, size: tuple[int, int], seed: int) -> np.ndarray:
    """Seeded N(0, I) latent [1,C,h,w] (numpy, so every backend starts from the same noise)."""
    f = model.dims.vae_factor
    shape = (1, model.dims.latent_channels, size[0] // f, size[1] // f)
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def sample_targets(sampler: Sampler, source: Source, prompts: Sequence[str],
                   config: TranslateConfig) -> tuple[list[Image.Image], np.ndarray]:
    """Inject into the target prompts, `prompt_batch_size` at a time, and decode."""
    ts = sampling_timesteps(sampler.model.schedule, config.steps)
    plan = InjectionPlan.from_taus(config.steps, config.feature_injection, config.attention_injection)
    stats, images, latents = sampler.stats, list[Image.Image](), list[np.ndarray]()
    with stats.stage("text"):
        negative = sampler.encode_prompts([config.negative_prompt])
    for first in range(0, len(prompts), config.prompt_batch_size):
        batch = list(prompts[first:first + config.prompt_batch_size])
        with stats.stage("text"):
            targets = sampler.encode_prompts(batch)
        with stats.stage("inject"):
            x = sampler.inject(source.start, source.captured, negative, targets, config.guidance_scale, ts, plan)
        latents.append(sampler.backend.to_numpy(x))
        with stats.stage("decode"):
            images.extend(to_pil(img) for img in sampler.decode(x))
    return images, np.concatenate(latents)


def translate(model: LoadedModel, prompts: Sequence[str], config: TranslateConfig | None = None,
              image: Image.Image | None = None, source_prompt: str | None = None,
              progress: Progress = no_progress) -> TranslateResult:
    """Translate a guidance image (or one generated from `source_prompt`) into each target prompt."""
    if (image is None) == (source_prompt is None):
        raise PnPError("give exactly one guidance: an image or a source prompt")
    if not prompts:
        raise PnPError("give at least one target prompt (--prompt TEXT)")
    config = config or TranslateConfig()
    size = plan_size(model, config, image)
    sampler = Sampler(model, progress=progress)
    source = prepare_source(sampler, config, size, image, source_prompt)
    images, latents = sample_targets(sampler, source, prompts, config)
    return TranslateResult(images, latents, sampler.stats, size)
