"""The torch backend on CUDA (fp16): runs wherever a CUDA GPU is, skipped elsewhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import in_threads, psnr, random_image

from pnp_trt import SourceCache, TranslateConfig, Translator
from pnp_trt.images import load_guidance
from pnp_trt.runtime.torch_backend import open_torch
from pnp_trt.runtime.translation import translate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CONFIG = TranslateConfig(steps=8, height=128, width=192, prompt_batch_size=2)
PROMPTS = ["a photo of a cat", "a painting of a dog", "a castle"]


def _psnrs(a, b) -> list[float]:
    return [psnr(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images, strict=True)]


def test_cuda_fp32_matches_cpu_fp32(tiny_model_dir: Path, tiny_torch, tmp_path: Path) -> None:
    image = load_guidance(random_image(tmp_path / "g.png", 192, 128))
    cuda = open_torch(str(tiny_model_dir), torch.device("cuda"), torch.float32)
    scores = _psnrs(translate(cuda, PROMPTS, CONFIG, image=image), translate(tiny_torch, PROMPTS, CONFIG, image=image))
    print(f"CUDA fp32 vs CPU fp32 PSNR: {scores}")
    assert min(scores) >= 45


def test_cuda_fp16_error_far_below_the_effect_of_injection(tiny_model_dir: Path, tmp_path: Path) -> None:
    """fp16 against fp32 on the same GPU: the rounding error must be far smaller than what switching
    injection off changes (DESIGN §3: fp16 is judged against the size of the effect, not a fixed dB)."""
    image = load_guidance(random_image(tmp_path / "g.png", 192, 128))
    half = open_torch(str(tiny_model_dir), torch.device("cuda"), torch.float16)
    full = open_torch(str(tiny_model_dir), torch.device("cuda"), torch.float32)
    reference = translate(full, PROMPTS, CONFIG, image=image)
    fp16 = _psnrs(translate(half, PROMPTS, CONFIG, image=image), reference)
    no_injection = TranslateConfig(**{**vars(CONFIG), "feature_injection": 0.0, "attention_injection": 0.0})
    plain = _psnrs(translate(full, PROMPTS, no_injection, image=image), reference)
    print(f"CUDA fp16 vs fp32 PSNR: {fp16}; injection off vs on (fp32): {plain}")
    assert min(fp16) >= max(plain) + 10


def test_translator_threads_on_cuda(tiny_model_dir: Path, tmp_path: Path) -> None:
    image = load_guidance(random_image(tmp_path / "g.png", 192, 128))
    cuda = open_torch(str(tiny_model_dir), torch.device("cuda"), torch.float16)
    serial = [Translator(cuda, SourceCache()).translate([p], image, **vars(CONFIG)).images[0] for p in PROMPTS]
    shared = Translator(cuda, SourceCache())
    threaded = in_threads([lambda p=p: shared.translate([p], image, **vars(CONFIG)).images[0] for p in PROMPTS])
    for a, b in zip(serial, threaded, strict=True):
        assert psnr(np.asarray(a), np.asarray(b)) >= 45


def test_sdxl_in_fp16_keeps_its_vae_in_fp32_and_its_error_far_below_injection(tiny_sdxl_dir: Path,
                                                                              tmp_path: Path) -> None:
    """SDXL on CUDA in fp16 (DESIGN §1b): the VAE runs in fp32 (`force_upcast`), the result stays closer to fp32
    than injection on vs off moves it."""
    image = load_guidance(random_image(tmp_path / "g.png", 160, 96))
    config = TranslateConfig(steps=8, height=96, width=160)
    half = open_torch(str(tiny_sdxl_dir), torch.device("cuda"), torch.float16)
    full = open_torch(str(tiny_sdxl_dir), torch.device("cuda"), torch.float32)
    assert half.backend.graphs["vae_decoder"].vae.dtype == torch.float32
    reference = translate(full, PROMPTS[:1], config, image=image)
    rounding = min(_psnrs(translate(half, PROMPTS[:1], config, image=image), reference))
    effect = min(_psnrs(translate(full, PROMPTS[:1], TranslateConfig(steps=8, height=96, width=160,
                                                                   feature_injection=0, attention_injection=0),
                                  image=image), reference))
    print(f"SDXL fp16 vs fp32 {rounding:.1f} dB; injection off vs on {effect:.1f} dB")
    assert rounding > effect + 6
