"""Guidance images reach the sampler the same way from a file or a PIL image: upright (EXIF), RGB, checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pnp_trt import TranslateConfig, Translator
from pnp_trt.errors import PnPError
from pnp_trt.images import load_guidance, normalize_guidance

SETTINGS = {"steps": 2, "height": 64, "width": 128}


def _sideways_photo(path: Path) -> Path:
    """A 128×64 picture, red on its left half, stored as a phone does: pixels 64×128 and EXIF orientation 6
    (rotate 90° clockwise to display)."""
    upright = np.zeros((64, 128, 3), np.uint8)
    upright[:, :64, 0] = 255
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif)
    return path


def test_exif_orientation_is_applied_for_files_and_pil_images(tmp_path: Path) -> None:
    path = _sideways_photo(tmp_path / "phone.jpg")
    for image in (load_guidance(path), normalize_guidance(Image.open(path))):
        pixels = np.asarray(image)
        assert image.size == (128, 64)
        assert pixels[:, :64, 0].mean() > 200 and pixels[:, 64:, 0].mean() < 50


@pytest.mark.parametrize("mode", ["RGBA", "CMYK", "L", "I;16", "P"])
def test_pil_images_of_any_mode_translate(tiny_torch, mode: str) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 128, 3), np.uint8)).convert(mode)
    result = Translator(tiny_torch).translate(["a cat"], image, **SETTINGS)
    assert [im.size for im in result.images] == [(128, 64)]


@pytest.mark.parametrize("size", [(1, 1), (0, 0), (63, 200)])
def test_too_small_pil_images_are_refused(tiny_torch, size: tuple[int, int]) -> None:
    with pytest.raises(PnPError, match="both sides must be at least 64 px"):
        Translator(tiny_torch).translate(["a cat"], Image.new("RGB", size), **SETTINGS)


def test_a_single_string_is_one_prompt(tiny_torch) -> None:
    image = Image.new("RGB", (128, 64), (40, 90, 200))
    assert len(Translator(tiny_torch).translate("a cat", image, **SETTINGS).images) == 1


@pytest.mark.parametrize("setting", ["guidance_scale", "source_guidance_scale"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scales_are_refused(setting: str, value: float) -> None:
    with pytest.raises(PnPError, match="must be a finite number"):
        TranslateConfig(**{setting: value})


def test_paths_may_be_strings(tiny_model_dir: Path, tmp_path: Path) -> None:
    translator = Translator.open("torch", model=str(tiny_model_dir), cache_dir=str(tmp_path / "cache"))
    translator.translate(["a cat"], Image.new("RGB", (128, 64), (40, 90, 200)), **SETTINGS)
    assert list((tmp_path / "cache").glob("*.safetensors"))


def test_16_bit_images_convert_exactly_without_float64_copies() -> None:
    """16-bit greyscale maps 0..65535 onto 0..255 (rounded); the conversion's peak allocation stays near the
    image's own size (tracemalloc counts numpy's buffers): 36 MiB for 16 MiB of pixels, where float64 took 192."""
    import tracemalloc

    values = np.array([[0, 257, 32768, 65535] * 16] * 64, dtype=np.uint16)
    converted = normalize_guidance(Image.fromarray(values))
    assert np.asarray(converted)[0, :4, 0].tolist() == [0, 1, 128, 255]
    big = Image.fromarray(np.full((2048, 4096), 40000, np.uint16))  # 16 MiB of pixels
    tracemalloc.start()
    try:
        normalize_guidance(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * 16 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_outputs_over_the_pixel_limit_are_refused(tiny_torch, exported: Path, tmp_path: Path) -> None:
    """The output size is bounded (memory grows with it): the API and the CLI refuse before any UNet call."""
    from typer.testing import CliRunner

    from pnp_trt.cli import app
    from pnp_trt.config import Limits

    image = Image.fromarray(np.zeros((64, 128, 3), np.uint8))
    with pytest.raises(PnPError, match=r"output 64x128 is 0.01 Mpx, over the 0.00 Mpx limit"):
        Translator(tiny_torch, limits=Limits(max_output_pixels=64 * 64)).translate("a cat", image, **SETTINGS)
    result = CliRunner().invoke(app, ["translate", "--source-prompt", "a cat", "-p", "a dog", "--height", "2048",
                                      "--width", "2048", "--out", str(tmp_path / "x.png"), "--backend",
                                      "onnxruntime", "--engines", str(exported)])
    assert result.exit_code == 2 and "is 4.19 Mpx, over the 1.05 Mpx limit" in result.output
    assert list(tmp_path.iterdir()) == []
