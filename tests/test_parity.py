"""Split capture/inject equals the paper's batch-of-three formulation (float64), and matches the golden."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GOLDEN, random_image, rel_err
from reference_pnp import PaperPnP

from pnp_trt.config import TranslateConfig
from pnp_trt.images import load_guidance, to_array
from pnp_trt.runtime.sampler import start_noise
from pnp_trt.runtime.torch_backend import open_torch
from pnp_trt.runtime.translation import translate

STEPS, SIZE = 6, (64, 128)


@pytest.fixture(scope="module")
def tiny64(tiny_model_dir: Path):
    return open_torch(str(tiny_model_dir), torch.device("cpu"), torch.float64)


@pytest.fixture(scope="module")
def paper64(tiny_model_dir: Path, tiny64) -> PaperPnP:
    """The reference, given the same float32 ᾱ as ours: diffusers computes ᾱ with torch's float32 linspace and
    cumprod, whose last bit depends on the CPU kernels (measured: under ATEN_CPU_CAPABILITY=default 121 of
    1000 values differ by one ulp from AVX2/AVX-512's, which moved this float64 comparison to 1.0e-7).
    pnp-trt's ᾱ equal diffusers' within one float32 ulp on any kernel (`test_schedule`)."""
    return PaperPnP(str(tiny_model_dir), torch.float64, torch.tensor(tiny64.schedule.alphas_cumprod))


def _config(tau_f: float, tau_a: float) -> TranslateConfig:
    return TranslateConfig(steps=STEPS, guidance_scale=6.0, feature_injection=tau_f, attention_injection=tau_a,
                           height=SIZE[0], width=SIZE[1], seed=3, negative_prompt="blurry")


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
def test_split_equals_batch_of_three_real_image(tiny64, paper64, tmp_path: Path, tau: float) -> None:
    image = load_guidance(random_image(tmp_path / "guide.png", SIZE[1], SIZE[0]))
    config = _config(tau, tau)
    ours = translate(tiny64, ["a photo of a cat"], config, image=image).latents
    source = paper64.invert(to_array(image, SIZE).astype(np.float64), STEPS)
    paper = paper64.translate(source, "a photo of a cat", "blurry", 6.0, STEPS, tau, tau).numpy()
    assert rel_err(ours, paper) <= 1e-9


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
def test_split_equals_batch_of_three_generated(tiny64, paper64, tau: float) -> None:
    config = _config(tau, tau)
    ours = translate(tiny64, ["a painting of a dog"], config, source_prompt="a photo of a castle").latents
    noise = start_noise(tiny64, SIZE, config.seed).astype(np.float64)
    source = paper64.generate(noise, "a photo of a castle", config.source_guidance_scale, STEPS)
    paper = paper64.translate(source, "a painting of a dog", "blurry", 6.0, STEPS, tau, tau).numpy()
    assert rel_err(ours, paper) <= 1e-9


def test_injection_matters(tiny64, tmp_path: Path) -> None:
    """τ = 0 (plain inversion + sampling) differs from the default injection by far more than rounding."""
    image = load_guidance(random_image(tmp_path / "guide.png", SIZE[1], SIZE[0]))
    injected = translate(tiny64, ["a photo of a cat"], _config(0.8, 0.5), image=image).latents
    plain = translate(tiny64, ["a photo of a cat"], _config(0.0, 0.0), image=image).latents
    attention_only = translate(tiny64, ["a photo of a cat"], _config(0.0, 0.5), image=image).latents
    assert rel_err(plain, injected) > 1e-3
    assert rel_err(attention_only, plain) > 1e-3


GOLDEN_BOUND = 2.5e-4


@pytest.fixture(scope="module")
def golden_run():
    """Translate the golden's guidance with its settings; `run(**overrides)` changes one setting."""
    settings = json.loads((GOLDEN / "settings.json").read_text())
    model = open_torch(str(GOLDEN / "model"), torch.device("cpu"), torch.float32)
    image = load_guidance(GOLDEN / "guide.png")

    def run(**overrides: float) -> np.ndarray:
        config = TranslateConfig(**{**dict(steps=settings["steps"], inversion_steps=settings["inversion_steps"],
                                           guidance_scale=settings["guidance_scale"],
                                           negative_prompt=settings["negative_prompt"],
                                           feature_injection=settings["feature_injection"],
                                           attention_injection=settings["attention_injection"]), **overrides})
        result = translate(model, [settings["prompt"]], config, image=image)
        assert result.size == (512, 768)
        return result.latents

    return run


def test_golden_latent_of_the_papers_code(golden_run) -> None:
    """The paper's own diffusers code, run on the golden tiny model: our float32 final latent within 2.5e-4.

    The bound is the golden's cross-CPU spread, measured (2026-12-01): the paper's code itself, re-run on an
    AVX2-only CPU, lands 1.64e-4 from the file (made on an AVX-512 machine); pnp-trt lands 2.0e-5 from the
    paper's code on that machine, and 1.62e-4 from the file there. On one AVX-512 EPYC, by torch's kernels
    (ATEN_CPU_CAPABILITY): AVX512 1.4e-5, AVX2 8.5e-5, DEFAULT 1.43e-4. Tight parity is the float64 tests above.
    """
    assert rel_err(golden_run(), np.load(GOLDEN / "final_latent.npy")) <= GOLDEN_BOUND


@pytest.mark.parametrize("defect", [{"feature_injection": 0.7}, {"attention_injection": 0.4}],
                         ids=["one_feature_step_fewer", "one_attention_step_fewer"])
def test_golden_bound_still_catches_an_injection_defect(golden_run, defect: dict[str, float]) -> None:
    """The bound's margin: one ResBlock-injection step fewer (int(8·0.7) = 5, not 6) or one attention-injection
    step fewer (int(8·0.4) = 3, not 4) misses the golden by far more than twice the bound: measured 7.4e-3 and
    2.6e-2 under each of torch's AVX512, AVX2 and DEFAULT kernels (attention injection off: 0.30)."""
    assert rel_err(golden_run(**defect), np.load(GOLDEN / "final_latent.npy")) > 2 * GOLDEN_BOUND
