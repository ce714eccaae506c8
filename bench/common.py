"""Shared by the benchmark scripts (run as `python bench/NAME.py`, so this folder is on sys.path)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def guide_image(size: int) -> Image.Image:
    """A smooth random square picture: blobs rather than pixel noise, like a photo's layout."""
    pixels = np.random.default_rng(0).integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)


def load_cpu_model(backend: str, source: str) -> Any:
    """A model on the CPU: an exported directory on ONNX Runtime, "random-sd21" (the SD 2.1-base shape, random
    weights, built in memory) or a diffusers directory on torch, fp32."""
    import torch

    from pnp_trt.models import quiet_loading
    from pnp_trt.random_models import random_model
    from pnp_trt.runtime.onnxruntime_backend import open_onnxruntime
    from pnp_trt.runtime.torch_backend import open_torch

    quiet_loading()
    if backend.startswith("onnxruntime"):
        return open_onnxruntime(Path(source))
    if source == "random-sd21":
        return open_torch(random_model("sd", 0))
    return open_torch(source, torch.device("cpu"), torch.float32)


def in_child(script: str, *args: object) -> dict:
    """`script --child ARGS` in a fresh process; its last stdout line as JSON (one measurement, alone)."""
    out = subprocess.run([sys.executable, script, "--child", *map(str, args)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def answer_child(child: list[str], measure: Any) -> None:
    """The child side of `in_child`: `measure(backend, source, size, steps)`, printed as one JSON line."""
    backend, source, size, steps = child
    print(json.dumps(measure(backend, source, int(size), int(steps))))
