"""ONNX Runtime (CPU) vs eager torch (CPU) on the same model and settings, per stage, plus start-up time
(process start → first UNet call) for both backends with the tiny model.

    python bench/onnxruntime_vs_torch.py [--sd21-size 256] [--sd21-steps 4] [--skip-sd21]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pnp_trt.config import TranslateConfig
from pnp_trt.export.exporter import export_loaded, export_model
from pnp_trt.models import quiet_loading
from pnp_trt.runtime.onnxruntime_backend import load_onnxruntime
from pnp_trt.runtime.torch_backend import load_torch, on_torch
from pnp_trt.runtime.translate import translate
from pnp_trt.tiny_model import make_tiny_model, random_sd21_model

STARTUP = """
import sys, time
from pnp_trt.images import load_guidance
from pnp_trt.runtime.loading import open_model
from pnp_trt.runtime.translate import translate
from pnp_trt.config import TranslateConfig
backend, model, engines, guide, t0 = sys.argv[1:6]
first = []
def progress(stage, total):
    if not first:
        first.append(time.time() - float(t0))
    return lambda: None
if backend == "torch":
    from pnp_trt.models import quiet_loading
    quiet_loading()
loaded = open_model(backend, model or None, engines or None)
translate(loaded, ["a cat"], TranslateConfig(steps=2, height=64, width=64), load_guidance(guide), progress=progress)
print(first[0])
"""


def guide(size: int) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
    return Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)


def timed(model, size: int, steps: int):
    config = TranslateConfig(steps=steps, height=size, width=size)
    translate(model, ["warm up"], TranslateConfig(steps=1, height=size, width=size), image=guide(size))
    start = time.perf_counter()
    result = translate(model, ["a watercolor painting of a castle"], config, image=guide(size))
    return time.perf_counter() - start, result.stats


def compare(name: str, torch_model, ort_model, size: int, steps: int) -> None:
    t_total, t_stats = timed(torch_model, size, steps)
    o_total, o_stats = timed(ort_model, size, steps)
    print(f"{name}, {size}x{size}, {steps} steps, {t_stats.unet_evals} UNet evaluations:")
    print(f"    {'stage':>9} {'torch':>9} {'onnxrt':>9} {'speed-up':>9}")
    for stage, t in t_stats.timings.items():
        o = o_stats.timings[stage]
        print(f"    {stage:>9} {t * 1000:>7.0f}ms {o * 1000:>7.0f}ms {t / o:>8.2f}x")
    print(f"    {'total':>9} {t_total:>8.2f}s {o_total:>8.2f}s {t_total / o_total:>8.2f}x")


def startup(backend: str, model: str, engines: str, image: Path) -> float:
    runs = []
    for _ in range(3):
        t0 = time.time()
        out = subprocess.run([sys.executable, "-c", STARTUP, backend, model, engines, str(image), str(t0)],
                             capture_output=True, text=True, check=True)
        runs.append(float(out.stdout.strip().splitlines()[-1]))
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny-size", type=int, default=512)
    parser.add_argument("--tiny-steps", type=int, default=10)
    parser.add_argument("--sd21-size", type=int, default=256)
    parser.add_argument("--sd21-steps", type=int, default=4)
    parser.add_argument("--skip-sd21", action="store_true")
    args = parser.parse_args()
    quiet_loading()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), fp32 on CPU; onnxruntime CPUExecutionProvider")
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny_model(Path(tmp) / "tiny")
        export_model(str(tiny), Path(tmp) / "tiny-onnx")
        compare("tiny model", load_torch(str(tiny), torch.device("cpu"), torch.float32),
                load_onnxruntime(Path(tmp) / "tiny-onnx"), args.tiny_size, args.tiny_steps)
        image = Path(tmp) / "guide.png"
        guide(64).save(image)
        t_start = startup("torch", str(tiny), "", image)
        o_start = startup("onnxruntime", "", str(Path(tmp) / "tiny-onnx"), image)
        print(f"start-up to first UNet call (tiny, best of 3): torch {t_start:.2f}s, onnxruntime {o_start:.2f}s "
              f"({t_start / o_start:.1f}x)")
        if not args.skip_sd21:
            export_loaded(random_sd21_model(0), Path(tmp) / "sd21-onnx")
            manifest = json.loads((Path(tmp) / "sd21-onnx" / "manifest.json").read_text())
            print(f"SD 2.1 export validation errors: {manifest['validation_relative_error']['unet']['noise_pred']:.1e}"
                  " (unet noise_pred, relative)")
            compare("SD 2.1-base shape, random weights", on_torch(random_sd21_model(0)),
                    load_onnxruntime(Path(tmp) / "sd21-onnx"), args.sd21_size, args.sd21_steps)


if __name__ == "__main__":
    main()
