"""The shorter critical path (DESIGN §2): capture rides along the inversion, generated guidance captures
from its own unconditional half. Same latents as one-at-a-time capture (float64), fewer sequential calls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_image, rel_err

from pnp_trt.config import TranslateConfig
from pnp_trt.images import load_guidance, to_array
from pnp_trt.runtime.sampler import (
    InjectionPlan,
    Sampler,
    Source,
    capture,
    generate_source,
    invert,
    prepare_source,
    sample_targets,
    start_noise,
)
from pnp_trt.runtime.torch_backend import open_torch
from pnp_trt.runtime.translation import translate
from pnp_trt.schedule import inversion_timesteps, sampling_timesteps

SIZE = (64, 128)
PROMPTS = ["a photo of a cat", "a painting of a dog"]


@pytest.fixture(scope="module")
def tiny64(tiny_model_dir: Path):
    return open_torch(str(tiny_model_dir), torch.device("cpu"), torch.float64)


def one_at_a_time(sampler: Sampler, config: TranslateConfig, pixels: np.ndarray | None,
                  source_prompt: str | None) -> Source:
    """The schedule before: inversion (or generation) first, then one capture call per injected step."""
    model = sampler.model
    ts, plan = sampling_timesteps(model.schedule, config.steps), InjectionPlan.of(config, model.dims.points)
    empty = sampler.encode_prompts([""])
    if pixels is not None:
        inv_ts = inversion_timesteps(model.schedule, config.steps, config.effective_inversion_steps)
        src, done = invert(sampler.unet, sampler.backend, model.schedule, sampler.encode_image(pixels), empty,
                           inv_ts, ts)
    else:
        noise = sampler.backend.asarray(start_noise(model, SIZE, config.seed))
        src, done, _ = generate_source(sampler.unet, sampler.backend, model.schedule, noise,
                                       sampler.encode_prompts([source_prompt or ""]), empty,
                                       config.source_guidance_scale, ts)
    assert done == {}
    return Source(src[ts[0]], capture(sampler.unet, sampler.backend, src, empty, ts, plan, done))


@pytest.mark.parametrize("guidance", ["image", "generated"])
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps", [(10, None), (10, 100)])
def test_fused_capture_equals_one_at_a_time(tiny64, tmp_path: Path, guidance: str, tau: float,
                                            steps: tuple[int, int | None]) -> None:
    if guidance == "generated" and steps[1] is not None:
        pytest.skip("generated guidance has no inversion")
    config = TranslateConfig(steps=steps[0], inversion_steps=steps[1], feature_injection=tau,
                             attention_injection=tau, height=SIZE[0], width=SIZE[1], seed=3)
    pixels = to_array(load_guidance(random_image(tmp_path / "g.png", SIZE[1], SIZE[0])), SIZE) \
        if guidance == "image" else None
    source_prompt = None if pixels is not None else "a photo of a castle"
    fused_sampler, plain_sampler = Sampler(tiny64), Sampler(tiny64)
    fused = prepare_source(fused_sampler, config, SIZE, pixels, source_prompt)
    plain = one_at_a_time(plain_sampler, config, pixels, source_prompt)
    fused_latents = sample_targets(fused_sampler, fused, PROMPTS, config, 2)[1]
    plain_latents = sample_targets(plain_sampler, plain, PROMPTS, config, 2)[1]
    assert rel_err(fused_latents, plain_latents) <= 1e-12
    capture_steps = InjectionPlan.of(config, tiny64.dims.points).capture_steps
    # the latent of the last inversion step has no later call to ride along: with inversion steps = sampling
    # steps that is the first sampling timestep, captured alone; with more inversion steps, it is never captured
    alone = guidance == "image" and steps[1] is None and capture_steps > 0
    saved_calls = capture_steps - alone
    assert fused_sampler.stats.unet_calls == plain_sampler.stats.unet_calls - saved_calls
    if guidance == "generated":
        assert fused_sampler.stats.unet_evaluations == plain_sampler.stats.unet_evaluations - capture_steps


@pytest.mark.parametrize("prompts", [1, 3])
def test_call_counts_at_the_defaults(tiny_torch, tmp_path: Path, prompts: int) -> None:
    """50 steps, τ_f 0.8, τ_A 0.5: 50 inversion calls carry 39 captures, 1 capture alone, 50 injection
    calls (140 before); generated guidance: 100 + 100 evaluations, no capture pass (240 before)."""
    config = TranslateConfig(steps=50, height=64, width=64, prompt_batch_size=prompts)
    targets = PROMPTS[:1] * prompts
    image = load_guidance(random_image(tmp_path / "g.png", 64, 64))
    real = translate(tiny_torch, targets, config, image=image).stats
    assert real.unet_calls == 50 + 1 + 50 <= 105
    assert real.unet_evaluations == 50 + 40 + 50 * 2 * prompts
    generated = translate(tiny_torch, targets, config, source_prompt="a castle").stats
    assert generated.unet_evaluations == 100 + 50 * 2 * prompts
    assert generated.unet_calls == 50 + 50
