"""The PnP sampler (DESIGN §1) over any `Backend`: it never asks which backend it runs on.

The whole algorithm in one file: the four loops (`invert`, `generate_source`, `capture`, `inject`), each a
short function over a `unet(x, t, embeddings, outputs, **injected)` callable, with progress as a per-step
callback; then the stages in the order a translation runs them (`prepare_source`, `sample_targets`):
encode → invert (or generate the guidance) → capture → inject → decode. `Sampler` binds a model for one
translation: its UNet callable counts calls. Inside the loops nothing waits on the device: each pass uploads
its timesteps once, the gates are device scalars made once, every call asks only for the outputs it reads,
and the DDIM arithmetic stays on the device.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..config import TranslateConfig
from ..contract import TEXT_OUTPUTS, InjectionPoint, captured_name, conditioning_specs, injected_name
from ..schedule import (
    Schedule,
    classifier_free_guidance,
    ddim_step,
    injection_steps,
    inversion_timesteps,
    invert_step,
    sampling_timesteps,
)
from .backend import Array, Backend, LoadedModel

NOISE = ("noise_pred",)
"""What the UNet calls that capture nothing read."""

Progress = Callable[[str, int], Callable[[], None]]
"""progress(stage, total) → advance(): called once per step of that stage."""


def no_progress(stage: str, total: int) -> Callable[[], None]:
    return lambda: None


@dataclass
class Stats:
    """Per-stage wall time (s), UNet sample-evaluations (a batch of n counts n) and UNet calls (the
    critical path on a GPU, where a call costs about the same whatever its batch)."""

    timings: dict[str, float] = field(default_factory=dict)
    unet_evaluations: int = 0
    unet_calls: int = 0
    sync: Callable[[], None] = field(default=lambda: None, repr=False)
    """Waits for the backend's queued work, so asynchronous (GPU) stages are timed where they run."""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


@dataclass(frozen=True)
class InjectionPlan:
    """How many leading steps inject features (τ_f) and attention (τ_A), at which points (the model's)."""

    feature_steps: int
    attention_steps: int
    points: tuple[InjectionPoint, ...]

    @classmethod
    def of(cls, config: TranslateConfig, points: tuple[InjectionPoint, ...]) -> InjectionPlan:
        return cls(injection_steps(config.steps, config.feature_injection),
                   injection_steps(config.steps, config.attention_injection), points)

    @property
    def capture_steps(self) -> int:
        """After the last injected step nothing needs capturing."""
        return max(self.feature_steps, self.attention_steps)

    def points_at(self, step: int) -> list[InjectionPoint]:
        """The injection points that inject at sampling step `step`."""
        return [p for p in self.points
                if step < (self.feature_steps if p.kind == "feature" else self.attention_steps)]

    def captures(self, sampling_ts: Sequence[int]) -> dict[int, list[InjectionPoint]]:
        """What to capture: per timestep of a step that injects, the points it injects."""
        return {t: self.points_at(i) for i, t in enumerate(sampling_ts[:self.capture_steps])}


Captured = list[dict[str, Array]]
"""Per sampling step (up to `capture_steps`), the captured tensors that step injects, by point name."""


@dataclass(frozen=True)
class RideAlong:
    """Captures that travel in the inversion's calls: of the latents at these timesteps (with the points
    each keeps), run with the empty prompt."""

    empty: Conditioning
    points: dict[int, list[InjectionPoint]]


@dataclass
class Source:
    """What target prompts are sampled against: the start latent x_T and the captured tensors."""

    start: Array
    captured: Captured
    guidance: Array | None = None
    """A generated guidance's own final latent x_0 (decoded only if asked for); None for a real image."""


Conditioning = dict[str, Array]
"""What conditions the UNet besides x and t, by input name, batch-aligned: the text embeddings, and for SDXL the
pooled embedding and size conditioning. The loops only join these; they never look inside."""


def join(arrays: Backend, parts: Sequence[Conditioning]) -> Conditioning:
    """Conditionings stacked along the batch, input by input."""
    return {name: arrays.concat([part[name] for part in parts]) for name in parts[0]}


class UNet(Protocol):
    """unet(x, t, embeddings, outputs, **injected): one UNet call; `t` holds one timestep per sample (a row of
    the pass's uploaded table); returns just the `outputs` named (the loops' model, as k-diffusion's
    samplers run over `model(x, sigma)`)."""

    def __call__(self, x: Array, t: Array, embeddings: Conditioning, outputs: Collection[str] = NOISE,
                 **injected: Array) -> dict[str, Array]: ...


Step = Callable[[], None]
"""Called once per step of a loop (progress)."""


def timestep_table(arrays: Backend, rows: Sequence[Sequence[int]]) -> Array:
    """A pass's timesteps, uploaded once: row i holds call i's timestep for each sample."""
    return arrays.asarray(np.asarray(rows, dtype=np.int64))


def invert(unet: UNet, arrays: Backend, schedule: Schedule, z0: Array, embedding: Conditioning,
           inversion_ts: Sequence[int], sampling_ts: Sequence[int], ride_along: RideAlong | None = None,
           step: Step = lambda: None) -> tuple[dict[int, Array], dict[int, dict[str, Array]]]:
    """DDIM inversion (small → large t); keeps the latent reached at every sampling timestep.

    With `ride_along`, the capture pass of each latent that a later step injects from travels in the
    next inversion call, which evaluates that same latent (at the next timestep, with the inversion
    prompt): one call of batch two instead of two calls. Returns the latents and the captures made.
    """
    keep, src, z, t_prev = set(sampling_ts), {}, z0, None
    wanted = ride_along.points if ride_along else {}
    captured: dict[int, dict[str, Array]] = {}
    pending = None
    pair = join(arrays, [embedding, ride_along.empty]) if ride_along else embedding
    previous = [inversion_ts[0], *inversion_ts[:-1]]
    table = timestep_table(arrays, [[t, prev] for t, prev in zip(inversion_ts, previous, strict=True)])
    for i, t in enumerate(inversion_ts):
        if pending is None:
            eps = unet(z, table[i, :1], embedding)["noise_pred"]
        else:  # pending is the previous timestep: row i is [t, pending]
            outputs = unet(arrays.concat([z, z]), table[i], pair, NOISE + read(wanted[pending]))
            eps, captured[pending] = outputs["noise_pred"][:1], keep_row(arrays, outputs, 1, wanted[pending])
        z = invert_step(schedule, z, eps, t, t_prev)
        if t in keep:
            src[t] = z
        pending = t if t in wanted else None
        t_prev = t
        step()
    return src, captured


def generate_source(unet: UNet, arrays: Backend, schedule: Schedule, noise: Array, cond: Conditioning,
                    empty: Conditioning,
                    scale: float, sampling_ts: Sequence[int], captures: dict[int, list[InjectionPoint]] | None = None,
                    step: Step = lambda: None) -> tuple[dict[int, Array], dict[int, dict[str, Array]], Array]:
    """Sample the guidance from `noise` with CFG against the empty prompt, keeping the latent entering
    each timestep. The unconditional half of a call is the capture pass of that latent (same latent,
    timestep and embedding): the points of `captures` are kept from it, for free. Returns those latents,
    the captures and the guidance's final latent."""
    src, captured, x, steps = {}, {}, noise, len(sampling_ts)
    captures = captures or {}
    embeddings = join(arrays, [empty, cond])
    table = timestep_table(arrays, [[t, t] for t in sampling_ts])
    for i, t in enumerate(sampling_ts):
        src[t] = x
        outputs = unet(arrays.concat([x, x]), table[i], embeddings, NOISE + read(captures.get(t, [])))
        if t in captures:
            captured[t] = keep_row(arrays, outputs, 0, captures[t])
        eps = outputs["noise_pred"]
        x = ddim_step(schedule, classifier_free_guidance(eps[:1], eps[1:], scale), x, t, steps)
        step()
    return src, captured, x


def capture(unet: UNet, arrays: Backend, src: dict[int, Array], empty: Conditioning, sampling_ts: Sequence[int],
            plan: InjectionPlan, done: dict[int, dict[str, Array]], step: Step = lambda: None) -> Captured:
    """Run the capture pass on the source latents not captured yet; keep only what each step injects."""
    captures = plan.captures(sampling_ts)
    missing = [t for t in captures if t not in done]
    table = timestep_table(arrays, [[t] for t in missing])
    for i, t in enumerate(missing):
        done[t] = keep_row(arrays, unet(src[t], table[i], empty, read(captures[t])), 0, captures[t])
        step()
    return [done[t] for t in captures]


def inject(unet: UNet, arrays: Backend, schedule: Schedule, x: Array, captured: Captured, negative: Conditioning,
           targets: Conditioning, scale: float, sampling_ts: Sequence[int], plan: InjectionPlan,
           gates: dict[bool, Array], step: Step = lambda: None) -> Array:
    """Sample N targets from the shared start x (batch 1), injecting the captured tensors (`gates[flag]`: the
    backend's bool scalars)."""
    n, steps = int(targets["encoder_hidden_states"].shape[0]), len(sampling_ts)
    embeddings = join(arrays, [negative] * n + [targets])
    x = arrays.concat([x] * n)
    table = timestep_table(arrays, [[t] * (2 * n) for t in sampling_ts])
    for i, t in enumerate(sampling_ts):
        eps = unet(arrays.concat([x, x]), table[i], embeddings, NOISE,
                   **injection_feeds(captured, i, plan, gates))["noise_pred"]
        x = ddim_step(schedule, classifier_free_guidance(eps[:n], eps[n:], scale), x, t, steps)
        step()
    return x


def keep_row(arrays: Backend, outputs: dict[str, Array], row: int, points: list[InjectionPoint]) -> dict[str, Array]:
    """One sample's captured tensors at `points`, copied out of the batch (so the rest can be freed)."""
    return {p.name: arrays.concat([outputs[captured_name(p)][row:row + 1]]) for p in points}


class Sampler:
    """The loops bound to one model for one translation: the UNet callable counts its calls into `stats`,
    progress is reported per stage, the gates are made once."""

    def __init__(self, model: LoadedModel, stats: Stats | None = None, progress: Progress = no_progress,
                 size: tuple[int, int] | None = None):
        self.model, self.backend, self.schedule, self.size = model, model.backend, model.schedule, size
        self.stats = stats or Stats(sync=self.backend.synchronize)
        self.progress = progress
        self.gates = {flag: self.backend.asarray(np.array(flag)) for flag in (False, True)}

    def unet(self, x: Array, t: Array, embeddings: Conditioning, outputs: Collection[str] = NOISE,
             **injected: Array) -> dict[str, Array]:
        """The `UNet` the loops call: counts evaluations (a batch of n counts n) and calls."""
        self.stats.unet_evaluations += int(x.shape[0])
        self.stats.unet_calls += 1
        feeds = {"sample": x, "timestep": t, **embeddings, **injected}
        return self.backend.run("unet", feeds, outputs)

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """The UNet's conditioning for each prompt: the text encoder graph's outputs and, where the family
        conditions on size, `time_ids` of this translation's output size (original = target, no crop)."""
        ids = {name: tokenizer.encode(prompts) for name, tokenizer in self.model.tokenizers.items()}
        text = self.backend.run("text_encoder", ids)
        conditioning = {}
        for spec in conditioning_specs(self.model.dims):
            if spec.name in TEXT_OUTPUTS:
                conditioning[spec.name] = text[TEXT_OUTPUTS[spec.name]]
            else:  # time_ids
                if self.size is None:
                    raise ValueError("this model conditions on the output size: make the Sampler with size=")
                height, width = self.size
                rows = np.tile(np.array([[height, width, 0, 0, height, width]], np.float32), (len(prompts), 1))
                conditioning[spec.name] = self.backend.asarray(rows)
        return conditioning

    def encode_image(self, image: np.ndarray) -> Array:
        """[1,3,H,W] in [0,1] → the scaled posterior mean z0."""
        return self.backend.run("vae_encoder", {"image": self.backend.asarray(image)})["latent"]

    def decode(self, latents: Array) -> np.ndarray:
        return self.backend.to_numpy(self.backend.run("vae_decoder", {"latent": latents})["image"])


# The stages in the order one translation runs them (DESIGN §1–2).

def prepare_source(sampler: Sampler, config: TranslateConfig, size: tuple[int, int],
                   image: np.ndarray | None, source_prompt: str | None) -> Source:
    """Invert the image (or generate from the source prompt) and capture what injection needs: the capture
    passes ride along the inversion's calls, or are the generation's unconditional half (DESIGN §2)."""
    model, stats = sampler.model, sampler.stats
    ts = sampling_timesteps(model.schedule, config.steps)
    plan = InjectionPlan.of(config, model.dims.points)
    with stats.stage("text"):
        empty = sampler.encode_prompts([""])
    captures, guidance = plan.captures(ts), None
    if image is not None:
        inv_ts = inversion_timesteps(model.schedule, config.steps, config.effective_inversion_steps)
        with stats.stage("encode"):
            z0 = sampler.encode_image(image)
        with stats.stage("text"):
            inv_emb = empty if not config.inversion_prompt else sampler.encode_prompts([config.inversion_prompt])
        with stats.stage("invert"):
            src, done = invert(sampler.unet, sampler.backend, model.schedule, z0, inv_emb, inv_ts, ts,
                               RideAlong(empty, captures), sampler.progress("invert", len(inv_ts)))
    else:
        noise = sampler.backend.asarray(start_noise(model, size, config.seed))
        with stats.stage("text"):
            cond = sampler.encode_prompts([source_prompt or ""])
        with stats.stage("generate"):
            src, done, guidance = generate_source(sampler.unet, sampler.backend, model.schedule, noise, cond, empty,
                                                  config.source_guidance_scale, ts, captures,
                                                  sampler.progress("generate", len(ts)))
    with stats.stage("capture"):
        missing = len([t for t in captures if t not in done])
        captured = capture(sampler.unet, sampler.backend, src, empty, ts, plan, done,
                           sampler.progress("capture", missing))
    return Source(src[ts[0]], captured, guidance)


def start_noise(model: LoadedModel, size: tuple[int, int], seed: int) -> np.ndarray:
    """Seeded N(0, I) latent [1,C,h,w] (numpy, so every backend starts from the same noise)."""
    f = model.dims.vae_factor
    shape = (1, model.dims.latent_channels, size[0] // f, size[1] // f)
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def sample_targets(sampler: Sampler, source: Source, prompts: Sequence[str], config: TranslateConfig,
                   per_batch: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Inject into the target prompts, `per_batch` at a time, and decode: images [3,H,W] in [0,1] and the
    final latents [N,C,h,w], one per prompt in order."""
    ts = sampling_timesteps(sampler.model.schedule, config.steps)
    plan = InjectionPlan.of(config, sampler.model.dims.points)
    stats, images, latents = sampler.stats, list[np.ndarray](), list[np.ndarray]()
    with stats.stage("text"):
        negative = sampler.encode_prompts([config.negative_prompt])
    for first in range(0, len(prompts), per_batch):
        with stats.stage("text"):
            targets = sampler.encode_prompts(list(prompts[first:first + per_batch]))
        with stats.stage("inject"):
            x = inject(sampler.unet, sampler.backend, sampler.schedule, source.start, source.captured, negative,
                       targets, config.guidance_scale, ts, plan, sampler.gates, sampler.progress("inject", len(ts)))
        latents.append(sampler.backend.to_numpy(x))
        with stats.stage("decode"):
            images.extend(sampler.decode(x))
    return images, np.concatenate(latents)


def read(points: Sequence[InjectionPoint]) -> tuple[str, ...]:
    """The UNet outputs holding these points' captured tensors."""
    return tuple(captured_name(p) for p in points)


def injection_feeds(captured: Captured, step: int, plan: InjectionPlan, gates: dict[bool, Array]) -> dict[str, Array]:
    """Injected tensors and gates (`gates[flag]`: the backend's bool scalars) for one injection step;
    absent inputs mean "not injected"."""
    if step >= plan.capture_steps:
        return {}
    feeds: dict[str, Array] = {injected_name(p): captured[step][p.name] for p in plan.points_at(step)}
    feeds["inject_features"] = gates[step < plan.feature_steps]
    feeds["inject_attention"] = gates[step < plan.attention_steps]
    return feeds
