"""Pure DDIM math (DESIGN §1): timesteps, inversion and sampling updates, classifier-free guidance.

Everything here works on numpy arrays and torch tensors alike: only arithmetic operators are applied
to arrays, the schedule coefficients are Python floats. Nothing here imports a backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import validation
from .errors import PnPError

Array = Any
"""An array: numpy.ndarray or a torch.Tensor on some device (here only arithmetic operators are used on it)."""

_SPACINGS = ("leading", "trailing", "linspace")
_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class Schedule:
    """The parts of a diffusers DDIM scheduler config that DDIM sampling with eta 0 depends on."""

    alphas_cumprod: tuple[float, ...]
    """ᾱ_t for t in [0, num_train_timesteps), computed in float32 exactly as diffusers does."""
    final_alpha_cumprod: float
    """ᾱ used past the last step: 1.0 with `set_alpha_to_one`, else ᾱ_0."""
    timestep_spacing: str
    steps_offset: int
    prediction_type: str
    """'epsilon' or 'v_prediction'."""
    clip_sample: bool
    clip_sample_range: float

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Schedule:
        """Read a diffusers scheduler config dict, every field it uses typed and bounded; refuse what DDIM
        eta 0 here does not implement."""
        if not isinstance(config, Mapping):
            raise PnPError(f"the scheduler config must be a JSON object, got {type(config).__name__}")
        field = _config_reader(config)
        kind = str(config.get("_class_name", ""))
        if "EDM" in kind or "FlowMatch" in kind or "sigma_data" in config:
            raise PnPError(f"the scheduler config is an EDM or flow-matching schedule ({kind or 'sigma_data'}), "
                           "which has no DDPM betas for DDIM inversion (Playground v2.5, SD3 and the like); PnP "
                           "runs DDPM-trained models")
        for flag in ("thresholding", "rescale_betas_zero_snr"):
            if field(flag, False, validation.boolean):
                raise PnPError(f"scheduler config sets `{flag}`, which pnp-trt does not implement; "
                               f"use a model whose scheduler config has {flag}=false")
        spacing = field("timestep_spacing", "leading", lambda n, v: validation.one_of(n, v, _SPACINGS))
        prediction = field("prediction_type", "epsilon",
                           lambda n, v: validation.one_of(n, v, ("epsilon", "v_prediction")))
        alphas = _alphas_cumprod(config, field)
        n = len(alphas)
        return cls(
            alphas_cumprod=tuple(float(a) for a in alphas),
            final_alpha_cumprod=1.0 if field("set_alpha_to_one", True, validation.boolean) else float(alphas[0]),
            timestep_spacing=spacing,
            steps_offset=field("steps_offset", 0, lambda name, v: validation.integer(name, v, 0, n - 1)),
            prediction_type=prediction,
            clip_sample=field("clip_sample", True, validation.boolean),
            clip_sample_range=field("clip_sample_range", 1.0, lambda name, v: validation.number(name, v, 1e-6)),
        )


def _config_reader(config: Mapping[str, Any]) -> Callable[[str, Any, Callable[[str, Any], Any]], Any]:
    """`field(key, default, check)`: a config value (the default when absent or null), checked by `check`, its
    error naming the scheduler config's field."""
    def field(key: str, default: Any, check: Callable[[str, Any], Any]) -> Any:
        value = config.get(key)
        return check(f"scheduler config `{key}`", default if value is None else value)
    return field


def _alphas_cumprod(config: Mapping[str, Any], field: Callable[..., Any]) -> np.ndarray:
    """ᾱ_t = Π(1 - β_s), rounded to float32 bit for bit as diffusers' DDIMScheduler computes them; every β in
    (0, 1)."""
    n = field("num_train_timesteps", 1000, lambda name, v: validation.integer(name, v, 2, 100_000))
    kind = field("beta_schedule", "linear", lambda name, v: validation.one_of(name, v, _BETA_SCHEDULES))
    start = field("beta_start", 0.0001, lambda name, v: validation.number(name, v, 1e-12, 0.999))
    end = field("beta_end", 0.02, lambda name, v: validation.number(name, v, 1e-12, 0.999))
    if end < start:
        raise PnPError(f"scheduler config `beta_start` {start} is above `beta_end` {end}; betas rise from start to end")
    if config.get("trained_betas") is not None:
        betas = _trained_betas(config["trained_betas"], n)
    elif kind == "linear":
        betas = _linspace_float32(start, end, n)
    elif kind == "scaled_linear":
        betas = _linspace_float32(start**0.5, end**0.5, n) ** 2
    else:  # squaredcos_cap_v2
        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                         dtype=np.float32)
    alphas = (np.float32(1.0) - betas).astype(np.float64)
    return np.cumprod(alphas).astype(np.float32)  # torch's CPU cumprod accumulates in float64


def _trained_betas(values: Any, n: int) -> np.ndarray:
    name = "scheduler config `trained_betas`"
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise PnPError(f"{name} must be a list of num_train_timesteps ({n}) numbers")
    return np.array([validation.number(f"{name}[{i}]", b, 1e-12, 0.999) for i, b in enumerate(values)],
                    dtype=np.float32)


def _linspace_float32(start: float, end: float, n: int) -> np.ndarray:
    """float32 linspace rounded as torch's CPU kernel does (diffusers builds betas with it):
    a float32 step, both halves counted from their own end point in float64."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(max(n - 1, 1)))
    i = np.arange(n, dtype=np.float64)
    values = np.where(i < n // 2, np.float64(start32) + step * i, np.float64(end32) - step * (n - 1 - i))
    return values.astype(np.float32)


def sampling_timesteps(schedule: Schedule, steps: int) -> list[int]:
    """The timesteps DDIM visits for `steps` steps, large → small, as diffusers' `set_timesteps`."""
    n = schedule.num_train_timesteps
    if steps < 1:
        raise PnPError(f"steps must be at least 1, got {steps}")
    if steps > n:
        raise PnPError(f"steps ({steps}) cannot exceed the model's {n} training timesteps")
    if schedule.timestep_spacing == "linspace":
        ts = np.linspace(0, n - 1, steps).round()[::-1].astype(np.int64)
    elif schedule.timestep_spacing == "leading":
        ts = (np.arange(0, steps) * (n // steps)).round()[::-1].astype(np.int64) + schedule.steps_offset
    else:
        ts = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
    return [int(t) for t in ts]


def inversion_timesteps(schedule: Schedule, steps: int, inversion_steps: int) -> list[int]:
    """Timesteps of the DDIM inversion, small → large; checks they reach every sampling timestep."""
    if inversion_steps < 1:
        raise PnPError(f"inversion steps must be at least 1, got {inversion_steps}")
    inv = sampling_timesteps(schedule, inversion_steps)[::-1]
    too_large = [t for t in inv if t >= schedule.num_train_timesteps]
    if too_large:
        raise PnPError(f"{inversion_steps} inversion steps reach timestep {too_large[-1]}, beyond the model's "
                       f"{schedule.num_train_timesteps} training timesteps; use fewer inversion steps")
    missing = sorted(set(sampling_timesteps(schedule, steps)) - set(inv))
    if missing:
        raise PnPError(f"inversion with {inversion_steps} steps never visits sampling timestep(s) "
                       f"{missing[:5]} of {steps} steps; choose a number of inversion steps that is a "
                       f"multiple of the {steps} sampling steps (e.g. {steps})")
    return inv


def to_epsilon(schedule: Schedule, model_output: Array, sample: Array, t: int) -> Array:
    """The noise ε the model predicts at timestep t (converting v-prediction: ε = √ᾱ_t·v + √(1-ᾱ_t)·x_t)."""
    if schedule.prediction_type == "epsilon":
        return model_output
    a_t = schedule.alphas_cumprod[t]
    return math.sqrt(a_t) * model_output + math.sqrt(1 - a_t) * sample


def invert_step(schedule: Schedule, z: Array, model_output: Array, t: int, t_prev: int | None) -> Array:
    """One DDIM inversion update from the previous inversion timestep to t (DESIGN §1, step 2)."""
    a_t = schedule.alphas_cumprod[t]
    a_prev = schedule.alphas_cumprod[t_prev] if t_prev is not None else schedule.final_alpha_cumprod
    eps = to_epsilon(schedule, model_output, z, t)
    x0 = (z - math.sqrt(1 - a_prev) * eps) / math.sqrt(a_prev)
    return math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps


def ddim_step(schedule: Schedule, model_output: Array, sample: Array, t: int, steps: int) -> Array:
    """x_{t-Δ} from x_t with eta 0, exactly as diffusers' `DDIMScheduler.step`."""
    t_prev = t - schedule.num_train_timesteps // steps
    a_t = schedule.alphas_cumprod[t]
    a_prev = schedule.alphas_cumprod[t_prev] if t_prev >= 0 else schedule.final_alpha_cumprod
    if schedule.prediction_type == "epsilon":
        x0 = (sample - math.sqrt(1 - a_t) * model_output) / math.sqrt(a_t)
        eps = model_output
    else:
        x0 = math.sqrt(a_t) * sample - math.sqrt(1 - a_t) * model_output
        eps = math.sqrt(a_t) * model_output + math.sqrt(1 - a_t) * sample
    if schedule.clip_sample:
        x0 = x0.clip(-schedule.clip_sample_range, schedule.clip_sample_range)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps


def classifier_free_guidance(uncond: Array, cond: Array, scale: float) -> Array:
    """ε = ε_uncond + s·(ε_cond − ε_uncond)."""
    return uncond + scale * (cond - uncond)


def injection_steps(steps: int, tau: float) -> int:
    """Number of leading sampling steps that inject: step i injects while i < int(steps·τ)."""
    return int(steps * tau)
