"""Per-stage time and UNet evaluations of one edit on the torch backend (CPU unless CUDA is present).

Models: the tiny SD and SDXL models (written to a temp dir, loaded like a user's), and the full SD 2.1-base and
SDXL-base shapes with random weights (speed depends on shapes, not weight values; SDXL-base needs ~14 GB of
memory in fp32). Prints its settings and the figures.

    python bench/stages.py [--sd21-size 256] [--sd21-steps 4] [--tiny-steps 20] [--skip-sd21]
        [--sdxl-size 256] [--sdxl-steps 2] [--skip-sdxl]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from common import guide_image

from pnp_trt.config import TranslateConfig
from pnp_trt.models import quiet_loading
from pnp_trt.random_models import make_tiny_model, random_model
from pnp_trt.runtime.torch_backend import open_torch
from pnp_trt.runtime.translation import translate

PAPER_PREPROCESS = 999 + 999  # the paper's preprocessing: 999 inversion + 999 reconstruction evaluations




def report(name: str, model, size: int, steps: int) -> None:
    config = TranslateConfig(steps=steps, height=size, width=size)
    translate(model, ["warm up"], TranslateConfig(steps=1, height=size, width=size), image=guide_image(size))
    start = time.perf_counter()
    result = translate(model, ["a watercolor painting of a castle"], config, image=guide_image(size))
    total = time.perf_counter() - start
    stages = "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.stats.timings.items())
    evals, calls = result.stats.unet_evaluations, result.stats.unet_calls
    print(f"{name}: {size}x{size}, {steps} steps: {total:.2f} s, {evals} UNet evaluations in {calls} sequential "
          f"calls ({total / evals * 1000:.0f} ms per evaluation)\n    {stages}")
    paper = PAPER_PREPROCESS + 3 * steps
    print(f"    paper's default pipeline at {steps} steps: {paper} evaluations ({paper / evals:.1f}x ours)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny-steps", type=int, default=20)
    parser.add_argument("--tiny-size", type=int, default=512)
    parser.add_argument("--sd21-steps", type=int, default=4)
    parser.add_argument("--sd21-size", type=int, default=256)
    parser.add_argument("--skip-sd21", action="store_true")
    parser.add_argument("--sdxl-steps", type=int, default=2)
    parser.add_argument("--sdxl-size", type=int, default=256)
    parser.add_argument("--skip-sdxl", action="store_true")
    args = parser.parse_args()
    quiet_loading()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"device {device}, {dtype}; torch {torch.__version__}")
    print(f"reference: the paper's defaults cost {PAPER_PREPROCESS} + 3x50 = {PAPER_PREPROCESS + 150} UNet "
          f"evaluations per edit; ours at 50 steps: 50 + 40 + 2x50 = 190 in 101 sequential UNet calls "
          f"(the 40 captures ride along the inversion's calls)")
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("sd", "sdxl"):
            tiny = open_torch(str(make_tiny_model(Path(tmp) / family, family=family)), device, dtype)
            report(f"tiny {family} model", tiny, args.tiny_size, args.tiny_steps)
    if not args.skip_sd21:
        report("SD 2.1-base shape, random weights", open_torch(random_model("sd", 0, device, dtype)),
               args.sd21_size, args.sd21_steps)
    if not args.skip_sdxl:
        report("SDXL-base shape, random weights", open_torch(random_model("sdxl", 0, device, dtype)),
               args.sdxl_size, args.sdxl_steps)


if __name__ == "__main__":
    main()
