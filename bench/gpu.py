"""GPU latency per stage: torch fp16, ONNX Runtime CUDA (if onnxruntime-gpu is installed) and TensorRT (if
installed and engines are given), on the SD 2.1-base shapes at 512×512 — random weights unless --model names
a real one (speed depends on shapes, not weight values). Prints UNet evaluations, ms per stage and the
achieved TFLOP/s of the UNet stages (0.804 TFLOP per UNet sample at 512²).

    python bench/gpu.py [--steps 50] [--prompts 1] [--model ID_OR_DIR] [--onnx DIR] [--engines DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import guide_image

from pnp_trt.config import TranslateConfig
from pnp_trt.runtime.translate import translate

UNET_TFLOP_PER_SAMPLE_512 = 0.804
UNET_STAGES = ("invert", "generate", "capture", "inject")




def measure(name: str, model, steps: int, prompts: int, size: int, repeats: int) -> None:
    config = TranslateConfig(steps=steps, height=size, width=size, prompt_batch_size=max(prompts, 1))
    targets = [f"a painting of a castle, style {i}" for i in range(prompts)]
    translate(model, targets, TranslateConfig(steps=2, height=size, width=size, prompt_batch_size=prompts),
              image=guide_image(size))
    best = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = translate(model, targets, config, image=guide_image(size))
        total = time.perf_counter() - start
        if best is None or total < best[0]:
            best = (total, result.stats)
    total, stats = best
    unet_s = sum(stats.timings.get(s, 0.0) for s in UNET_STAGES)
    tflops = stats.unet_evals * UNET_TFLOP_PER_SAMPLE_512 * (size / 512) ** 2 / unet_s
    stages = "  ".join(f"{k} {v * 1000:.1f}" for k, v in stats.timings.items())
    print(f"{name}: {total * 1000:.0f} ms end to end (best of {repeats}), {stats.unet_evals} UNet evaluations, "
          f"{unet_s / stats.unet_evals * 1000:.2f} ms per evaluation, {tflops:.0f} TFLOP/s in UNet stages\n"
          f"    ms per stage: {stages}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", help="hub id or diffusers directory (default: random SD 2.1-base weights)")
    parser.add_argument("--onnx", type=Path, help="exported directory for ONNX Runtime CUDA")
    parser.add_argument("--engines", type=Path, help="exported directory with TensorRT engines")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU")
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; {args.size}x{args.size}, "
          f"{args.steps} steps, {args.prompts} prompt(s), real image guidance")
    from pnp_trt.runtime.torch_backend import load_torch, on_torch

    if args.model:
        model = load_torch(args.model, torch.device("cuda"), torch.float16)
    else:
        from pnp_trt.tiny_model import random_sd21_model
        model = on_torch(random_sd21_model(0, torch.device("cuda"), torch.float16))
    measure("torch fp16", model, args.steps, args.prompts, args.size, args.repeats)
    if args.onnx:
        from pnp_trt.runtime.onnxruntime_backend import load_onnxruntime
        measure("onnxruntime CUDA", load_onnxruntime(args.onnx, "cuda"), args.steps, args.prompts, args.size,
                args.repeats)
    if args.engines:
        from pnp_trt.runtime.tensorrt_backend import load_tensorrt
        measure("tensorrt", load_tensorrt(args.engines), args.steps, args.prompts, args.size, args.repeats)


if __name__ == "__main__":
    main()
