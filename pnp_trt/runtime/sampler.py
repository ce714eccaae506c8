"""The PnP sampler (DESIGN §1) over any `Backend`: it never asks which backend it runs on.

The whole algorithm in one file: the four loops (invert, generate, capture, inject) as `Sampler` methods, then
the stages in the order a translation runs them (`prepare_source`, `sample_targets`): encode → invert (or
generate the guidance) → capture → inject → decode. Each loop is a short
function over `run(graph, feeds, outputs)`; `Sampler` only adds UNet-evaluation counting and progress.
Inside the loops nothing waits on the device: each pass uploads its timesteps once, the gates are device
scalars made once, every call asks only for the outputs it reads, and the DDIM arithmetic stays on the device.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..config import TranslateConfig
from ..contract import INJECTION_POINTS, InjectionPoint, captured_name, injected_name
from ..schedule import (
    classifier_free_guidance,
    ddim_step,
    injection_steps,
    inversion_timesteps,
    invert_step,
    sampling_timesteps,
)
from .backend import Array, LoadedModel

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
    unet_evals: int = 0
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
    """How many leading steps inject features (τ_f) and attention (τ_A)."""

    feature_steps: int
    attention_steps: int

    @classmethod
    def of(cls, config: TranslateConfig) -> InjectionPlan:
        return cls(injection_steps(config.steps, config.feature_injection),
                   injection_steps(config.steps, config.attention_injection))

    @property
    def capture_steps(self) -> int:
        """After the last injected step nothing needs capturing."""
        return max(self.feature_steps, self.attention_steps)

    def points_at(self, step: int) -> list[InjectionPoint]:
        """The injection points that inject at sampling step `step`."""
        return [p for p in INJECTION_POINTS
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

    empty: Array
    points: dict[int, list[InjectionPoint]]


@dataclass
class Source:
    """What target prompts are sampled against: the start latent x_T and the captured tensors."""

    start: Array
    captured: Captured
    guidance: Array | None = None
    """A generated guidance's own final latent x_0 (decoded only if asked for); None for a real image."""


class Sampler:
    def __init__(self, model: LoadedModel, stats: Stats | None = None, progress: Progress = no_progress):
        self.model, self.backend, self.schedule = model, model.backend, model.schedule
        self.stats = stats or Stats(sync=self.backend.synchronize)
        self.progress = progress
        self.gates = {flag: self.backend.asarray(np.array(flag)) for flag in (False, True)}

    def timesteps(self, rows: Sequence[Sequence[int]]) -> Array:
        """A pass's timesteps, uploaded once: row i holds call i's timestep for each sample."""
        return self.backend.asarray(np.asarray(rows, dtype=np.int64))

    def unet(self, sample: Array, timesteps: Array, embeddings: Array, outputs: Collection[str],
             **extra: Array) -> dict[str, Array]:
        """One UNet call: `timesteps` holds one timestep per sample; returns just the `outputs` named."""
        self.stats.unet_evals += int(sample.shape[0])
        self.stats.unet_calls += 1
        feeds = {"sample": sample, "timestep": timesteps, "encoder_hidden_states": embeddings, **extra}
        return self.backend.run("unet", feeds, outputs)

    def encode_prompts(self, prompts: Sequence[str]) -> Array:
        ids = self.model.tokenizer.encode(prompts)
        return self.backend.run("text_encoder", {"input_ids": ids})["text_embeddings"]

    def encode_image(self, image: np.ndarray) -> Array:
        """[1,3,H,W] in [0,1] → the scaled posterior mean z0."""
        return self.backend.run("vae_encoder", {"image": self.backend.asarray(image)})["latent"]

    def decode(self, latents: Array) -> np.ndarray:
        return self.backend.to_numpy(self.backend.run("vae_decoder", {"latent": latents})["image"])

    def invert(self, z0: Array, embedding: Array, inversion_ts: Sequence[int], sampling_ts: Sequence[int],
               ride_along: RideAlong | None = None) -> tuple[dict[int, Array], dict[int, dict[str, Array]]]:
        """DDIM inversion (small → large t); keeps the latent reached at every sampling timestep.

        With `ride_along`, the capture pass of each latent that a later step injects from travels in the
        next inversion call, which evaluates that same latent (at the next timestep, with the inversion
        prompt): one call of batch two instead of two calls. Returns the latents and the captures made.
        """
        keep, src, z, t_prev = set(sampling_ts), {}, z0, None
        wanted = ride_along.points if ride_along else {}
        captured: dict[int, dict[str, Array]] = {}
        pending = None
        pair = self.backend.concat([embedding, ride_along.empty]) if ride_along else embedding
        previous = [inversion_ts[0], *inversion_ts[:-1]]
        table = self.timesteps([[t, prev] for t, prev in zip(inversion_ts, previous, strict=True)])
        advance = self.progress("invert", len(inversion_ts))
        for i, t in enumerate(inversion_ts):
            if pending is None:
                eps = self.unet(z, table[i, :1], embedding, NOISE)["noise_pred"]
            else:  # pending is the previous timestep: row i is [t, pending]
                outputs = self.unet(self.backend.concat([z, z]), table[i], pair, NOISE + read(wanted[pending]))
                eps, captured[pending] = outputs["noise_pred"][:1], self._row(outputs, 1, wanted[pending])
            z = invert_step(self.schedule, z, eps, t, t_prev)
            if t in keep:
                src[t] = z
            pending = t if t in wanted else None
            t_prev = t
            advance()
        return src, captured

    def generate_source(self, noise: Array, cond: Array, empty: Array, scale: float, sampling_ts: Sequence[int],
                        captures: dict[int, list[InjectionPoint]] | None = None,
                        ) -> tuple[dict[int, Array], dict[int, dict[str, Array]], Array]:
        """Sample the guidance from `noise` with CFG against the empty prompt, keeping the latent entering
        each timestep. The unconditional half of a call is the capture pass of that latent (same latent,
        timestep and embedding): the points of `captures` are kept from it, for free. Returns those latents,
        the captures and the guidance's final latent."""
        src, captured, x, steps = {}, {}, noise, len(sampling_ts)
        embeddings = self.backend.concat([empty, cond])
        table = self.timesteps([[t, t] for t in sampling_ts])
        advance = self.progress("generate", steps)
        for i, t in enumerate(sampling_ts):
            src[t] = x
            kept = read(captures[t]) if captures and t in captures else ()
            outputs = self.unet(self.backend.concat([x, x]), table[i], embeddings, NOISE + kept)
            if captures and t in captures:
                captured[t] = self._row(outputs, 0, captures[t])
            eps = outputs["noise_pred"]
            x = ddim_step(self.schedule, classifier_free_guidance(eps[:1], eps[1:], scale), x, t, steps)
            advance()
        return src, captured, x

    def capture(self, src: dict[int, Array], empty: Array, sampling_ts: Sequence[int], plan: InjectionPlan,
                done: dict[int, dict[str, Array]]) -> Captured:
        """Run the capture pass on the source latents not captured yet; keep only what each step injects."""
        captures = plan.captures(sampling_ts)
        missing = [t for t in captures if t not in done]
        table = self.timesteps([[t] for t in missing])
        advance = self.progress("capture", len(missing))
        for i, t in enumerate(missing):
            done[t] = self._row(self.unet(src[t], table[i], empty, read(captures[t])), 0, captures[t])
            advance()
        return [done[t] for t in captures]

    def _row(self, outputs: dict[str, Array], row: int, points: list[InjectionPoint]) -> dict[str, Array]:
        """One sample's captured tensors at `points`, copied out of the batch (so the rest can be freed)."""
        return {p.name: self.backend.concat([outputs[captured_name(p)][row:row + 1]]) for p in points}

    def inject(self, x: Array, captured: Captured, negative: Array, targets: Array, scale: float,
               sampling_ts: Sequence[int], plan: InjectionPlan) -> Array:
        """Sample N targets from the shared start x (batch 1), injecting the captured tensors."""
        n, steps = int(targets.shape[0]), len(sampling_ts)
        embeddings = self.backend.concat([negative] * n + [targets])
        x = self.backend.concat([x] * n)
        table = self.timesteps([[t] * (2 * n) for t in sampling_ts])
        advance = self.progress("inject", steps)
        for i, t in enumerate(sampling_ts):
            eps = self.unet(self.backend.concat([x, x]), table[i], embeddings, NOISE,
                            **injection_feeds(captured, i, plan, self.gates))["noise_pred"]
            x = ddim_step(self.schedule, classifier_free_guidance(eps[:n], eps[n:], scale), x, t, steps)
            advance()
        return x


# The stages in the order one translation runs them (DESIGN §1–2).

def prepare_source(sampler: Sampler, config: TranslateConfig, size: tuple[int, int],
                   image: np.ndarray | None, source_prompt: str | None) -> Source:
    """Invert the image (or generate from the source prompt) and capture what injection needs: the capture
    passes ride along the inversion's calls, or are the generation's unconditional half (DESIGN §2)."""
    model, stats = sampler.model, sampler.stats
    ts = sampling_timesteps(model.schedule, config.steps)
    plan = InjectionPlan.of(config)
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
            src, done = sampler.invert(z0, inv_emb, inv_ts, ts, RideAlong(empty, captures))
    else:
        noise = sampler.backend.asarray(start_noise(model, size, config.seed))
        with stats.stage("text"):
            cond = sampler.encode_prompts([source_prompt or ""])
        with stats.stage("generate"):
            src, done, guidance = sampler.generate_source(noise, cond, empty, config.source_guidance_scale, ts,
                                                          captures)
    with stats.stage("capture"):
        captured = sampler.capture(src, empty, ts, plan, done)
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
    plan = InjectionPlan.of(config)
    stats, images, latents = sampler.stats, list[np.ndarray](), list[np.ndarray]()
    with stats.stage("text"):
        negative = sampler.encode_prompts([config.negative_prompt])
    for first in range(0, len(prompts), per_batch):
        with stats.stage("text"):
            targets = sampler.encode_prompts(list(prompts[first:first + per_batch]))
        with stats.stage("inject"):
            x = sampler.inject(source.start, source.captured, negative, targets, config.guidance_scale, ts, plan)
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
