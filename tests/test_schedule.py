"""Our pure DDIM math equals diffusers' DDIMScheduler over whole schedules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from pnp_trt.errors import PnPError
from pnp_trt.schedule import (
    Schedule,
    classifier_free_guidance,
    ddim_step,
    injection_steps,
    inversion_timesteps,
    invert_step,
    sampling_timesteps,
)

BASE = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
        "clip_sample": False}
CONFIGS = [
    {**BASE, "timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False},
    {**BASE, "timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True},
    {**BASE, "timestep_spacing": "trailing", "steps_offset": 0, "set_alpha_to_one": False,
     "prediction_type": "v_prediction"},
    {**BASE, "timestep_spacing": "linspace", "steps_offset": 0, "set_alpha_to_one": True,
     "prediction_type": "v_prediction"},
    {"beta_schedule": "linear", "timestep_spacing": "leading", "steps_offset": 1, "clip_sample": True,
     "clip_sample_range": 1.0, "set_alpha_to_one": True},
    {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "trailing", "clip_sample": False,
     "set_alpha_to_one": False, "num_train_timesteps": 500},
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_ddim_matches_diffusers(config: dict, steps: int) -> None:
    reference = DDIMScheduler(**config)
    reference.set_timesteps(steps)
    ours = Schedule.from_config(reference.config)
    timesteps = sampling_timesteps(ours, steps)
    assert timesteps == reference.timesteps.tolist()
    rng = np.random.default_rng(steps)
    x = rng.standard_normal((1, 4, 8, 8))
    for t in timesteps:  # every step of the schedule (float64 in, so only the math is compared)
        out = rng.standard_normal(x.shape)
        expected = reference.step(torch.from_numpy(out), t, torch.from_numpy(x), eta=0.0).prev_sample.numpy()
        got = ddim_step(ours, out, x, t, steps)
        assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max()
        x = expected


@pytest.mark.parametrize("config", CONFIGS)
def test_alphas_equal_diffusers_to_one_float32_ulp(config: dict) -> None:
    """ᾱ as diffusers computes them, bit for bit on torch's AVX2/AVX-512 kernels; its DEFAULT kernels round
    some of its float32 linspace/cumprod the other way (measured: 121 of 1000 values, by 2^-24). Ours are
    numpy's, the same on every CPU."""
    reference = DDIMScheduler(**config).alphas_cumprod.numpy().astype(np.float64)
    ours = np.array(Schedule.from_config(config).alphas_cumprod)
    assert np.abs(ours - reference).max() <= 2.0**-24
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert np.array_equal(ours, reference)


def test_step_works_on_torch_tensors() -> None:
    schedule = Schedule.from_config(CONFIGS[0])
    x, eps = torch.ones(1, 4, 2, 2, dtype=torch.float64), torch.full((1, 4, 2, 2), 0.5, dtype=torch.float64)
    assert torch.allclose(ddim_step(schedule, eps, x, 981, 50),
                          torch.from_numpy(ddim_step(schedule, eps.numpy(), x.numpy(), 981, 50)))


def test_inversion_step_is_ddim_step_reversed() -> None:
    """With the same ε, inverting from t_prev to t and stepping back from t returns the start."""
    schedule = Schedule.from_config(CONFIGS[0])
    ts = sampling_timesteps(schedule, 10)
    z = np.random.default_rng(0).standard_normal((1, 4, 4, 4))
    eps = np.random.default_rng(1).standard_normal(z.shape)
    up = invert_step(schedule, z, eps, ts[2], ts[3])
    np.testing.assert_allclose(ddim_step(schedule, eps, up, ts[2], 10), z, rtol=1e-10, atol=1e-10)


def test_v_prediction_inversion_converts_to_epsilon() -> None:
    schedule = Schedule.from_config(CONFIGS[2])
    z, v = np.ones((1, 1, 1, 1)), np.full((1, 1, 1, 1), 0.3)
    a = schedule.alphas_cumprod[500]
    eps = np.sqrt(a) * v + np.sqrt(1 - a) * z
    as_eps = Schedule.from_config({**CONFIGS[2], "prediction_type": "epsilon"})
    np.testing.assert_allclose(invert_step(schedule, z, v, 500, 400), invert_step(as_eps, z, eps, 500, 400))


def test_inversion_timesteps_and_errors() -> None:
    schedule = Schedule.from_config(CONFIGS[0])
    assert inversion_timesteps(schedule, 10, 10) == sampling_timesteps(schedule, 10)[::-1]
    assert set(sampling_timesteps(schedule, 10)) <= set(inversion_timesteps(schedule, 10, 20))
    with pytest.raises(PnPError, match="never visits sampling timestep") as refused:
        inversion_timesteps(schedule, 10, 15)
    assert "--" not in str(refused.value)  # every surface reads it (corpus 14 A68: the API read a CLI flag)
    with pytest.raises(PnPError, match="beyond the model's 1000 training timesteps"):
        inversion_timesteps(schedule, 1, 1000)
    assert max(inversion_timesteps(schedule, 1, 999)) == 999


def test_refuses_unimplemented_configs() -> None:
    with pytest.raises(PnPError, match="thresholding"):
        Schedule.from_config({**BASE, "thresholding": True})
    with pytest.raises(PnPError, match="rescale_betas_zero_snr"):
        Schedule.from_config({**BASE, "rescale_betas_zero_snr": True})
    with pytest.raises(PnPError, match="steps must be at least 1"):
        sampling_timesteps(Schedule.from_config(BASE), 0)


def test_guidance_and_injection_counts() -> None:
    assert classifier_free_guidance(1.0, 3.0, 7.5) == 16.0
    assert (injection_steps(50, 0.8), injection_steps(50, 0.5), injection_steps(8, 0.8), injection_steps(3, 1.0)) \
        == (40, 25, 6, 3)


@pytest.mark.parametrize("change,fragment", [
    ({"steps_offset": -1}, "`steps_offset` must be between 0 and 999, got -1"),
    ({"steps_offset": 1.5}, "`steps_offset` must be a whole number"),
    ({"beta_end": 2.0}, "`beta_end` must be between"),
    ({"beta_start": -0.1}, "`beta_start` must be between"),
    ({"beta_start": 0.02, "beta_end": 0.01}, "`beta_start` 0.02 is above `beta_end` 0.01"),  # corpus 9
    ({"trained_betas": [float("nan")] * 1000}, "`trained_betas`[0] must be a finite number"),
    ({"trained_betas": [1.5] * 1000}, "`trained_betas`[0] must be between"),
    ({"trained_betas": [0.01] * 10}, "`trained_betas` must be a list of num_train_timesteps (1000) numbers"),
    ({"clip_sample": "false"}, "`clip_sample` must be true or false, got 'false' (str)"),
    ({"_class_name": "EDMDPMSolverMultistepScheduler", "sigma_data": 0.5}, "EDM or flow-matching schedule"),
    ({"set_alpha_to_one": 0}, "`set_alpha_to_one` must be true or false"),
    ({"num_train_timesteps": "1000"}, "`num_train_timesteps` must be a whole number"),
    ({"timestep_spacing": "random"}, "`timestep_spacing` must be one of"),
    ({"beta_schedule": "sigmoid"}, "`beta_schedule` must be one of"),
    ({"prediction_type": "sample"}, "`prediction_type` must be one of"),
    ({"clip_sample_range": float("inf")}, "`clip_sample_range` must be a finite number"),
    ({"thresholding": True}, "does not implement"),
])
def test_a_bad_scheduler_config_field_is_named_in_one_line(change: dict, fragment: str) -> None:
    """Every field the schedule reads is typed and bounded: none becomes a black or silently odd image (a
    negative offset wrapped to ᾱ[999], β > 1 made ᾱ negative, the string "false" was true)."""
    with pytest.raises(PnPError) as error:
        Schedule.from_config({**BASE, **change})
    assert fragment in str(error.value) and "\n" not in str(error.value)
