"""Peak memory (resident set) of one translation per output size, each case in a fresh process, so the
README can say what a size costs and `--max-output-mpx` has a measured default.

    python bench/peak_memory.py [--sizes 256 512 768 1024] [--steps 2] [--sd21-sizes 256 512]

Cases: the tiny model on ONNX Runtime (CPU; exported with standard attention, the ONNX standard's fused
`Attention`, `--attention onnx`, and ONNX Runtime's fused op, `--attention onnxruntime`) and torch (CPU); the
SD 2.1-base shape (random weights) on torch.
Reported: peak RSS of the process (includes the weights), and its growth over the same process loaded but
idle, i.e. what the translation itself took; and the translation's wall time (first call: sessions are made
in it).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import answer_child, guide_image, in_child, load_cpu_model


def measure(backend: str, source: str, size: int, steps: int) -> dict:
    """In this process: load, note RSS, translate once, return the peak."""
    from pnp_trt.config import Limits, TranslateConfig
    from pnp_trt.runtime.translation import translate

    model = load_cpu_model(backend, source)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    translate(model, ["a castle"], TranslateConfig(steps=steps, height=size, width=size), image=guide_image(size),
              limits=Limits(max_output_pixels=size * size))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"loaded": loaded, "peak": peak, "seconds": seconds}


def report(name: str, backend: str, source: str, sizes: list[int], steps: int) -> None:
    for size in sizes:
        m = in_child(__file__, backend, source, size, steps)
        peak, grown = m["peak"] / 2**30, (m["peak"] - m["loaded"]) / 2**30
        print(f"    {name:<28} {backend:<12} {size:>5}² {peak:>8.2f} GiB {grown:>8.2f} GiB {m['seconds']:>8.1f} s",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 768, 1024])
    parser.add_argument("--sd21-sizes", type=int, nargs="*", default=[256, 512])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        answer_child(args.child, measure)
        return
    import onnxruntime
    import torch

    from pnp_trt.random_models import make_tiny_model

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__} CPU; fp32; {args.steps} steps, one prompt, one fresh process per case")
    print(f"    {'model':<28} {'backend':<12} {'size':>6} {'peak RSS':>12} {'translation':>12} {'time':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny_model(Path(tmp) / "tiny")
        for attention in ("standard", "onnx", "onnxruntime"):
            exported = Path(tmp) / f"tiny-{attention}"
            subprocess.run([sys.executable, "-m", "pnp_trt.cli", "export", "--model", str(tiny), "--out",
                            str(exported), "--attention", attention], check=True, capture_output=True)
            report(f"tiny, {attention} attention", "onnxruntime", str(exported), args.sizes, args.steps)
        report("tiny", "torch", str(tiny), args.sizes, args.steps)
        report("SD 2.1-base shape (random)", "torch", "random-sd21", args.sd21_sizes, args.steps)


if __name__ == "__main__":
    main()
