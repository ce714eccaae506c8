from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pnp_trt.random_models import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL-shaped model of DESIGN §1b (random weights, diffusers format)."""
    from pnp_trt.random_models import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", seed=0, family="sdxl")


@pytest.fixture(scope="session")
def tiny_torch(tiny_model_dir: Path):
    import torch

    from pnp_trt.runtime.torch_backend import open_torch
    return open_torch(str(tiny_model_dir), torch.device("cpu"), torch.float32)


@pytest.fixture(scope="session")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from typer.testing import CliRunner

    from pnp_trt.cli import app

    out = tmp_path_factory.mktemp("onnx") / "tiny-fp32"
    result = CliRunner().invoke(app, ["export", "--model", str(tiny_model_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "unet: noise_pred" in result.output and "captured_k_up3_attn2" in result.output
    return out


@pytest.fixture(scope="session")
def exported_fp16(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pnp_trt.export.exporter import export_model

    out = tmp_path_factory.mktemp("onnx16") / "tiny-fp16"
    export_model(str(tiny_model_dir), out, "fp16")
    return out


def random_image(path: Path, width: int, height: int, mode: str = "RGB", seed: int = 0) -> Path:
    """A smooth random picture (blobs, not pixel noise) so a VAE round trip keeps its layout."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC).convert(mode).save(path)
    return path


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a − ref| / max |ref|: error relative to the size of what is compared."""
    return float(np.abs(np.asarray(a) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max())


def in_threads(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run every job in its own thread, all at once; their results in job order."""
    results: list[Any] = [None] * len(jobs)

    def work(index: int) -> None:
        results[index] = jobs[index]()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results
