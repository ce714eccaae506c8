"""ONNX Runtime (CPU) vs eager torch (CPU) on the same model and settings, per stage, plus start-up time
(process start → first UNet call) for both backends with the tiny model. A third column runs ONNX Runtime
with every UNet output copied out on every call (as before the sampler asked only for what it reads); a
fourth, ONNX Runtime on an export with fused attention (`--attention onnxruntime`).

Each measurement runs in its own process: torch's OpenMP workers keep spinning after each op and would
steal the cores from ONNX Runtime's threads if both ran in one process.

    python bench/onnxruntime_vs_torch.py [--sd21-size 256] [--sd21-steps 4] [--skip-sd21]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import answer_child, guide_image, in_child, load_cpu_model


class EveryOutput:
    """A backend whose UNet calls return all 18 outputs whatever the sampler asks (the old behaviour)."""

    def __init__(self, backend):
        self.backend = backend

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def run(self, graph, feeds, outputs=None):
        return self.backend.run(graph, feeds)


STARTUP = """
import sys, time
from pnp_trt.images import load_guidance
from pnp_trt.runtime.loading import open_model
from pnp_trt.runtime.translation import translate
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




def measure(backend: str, source: str, size: int, steps: int) -> dict:
    """In this process: one warm-up, then one timed translation; returns stage timings."""
    from pnp_trt.config import TranslateConfig
    from pnp_trt.runtime.translation import translate

    model = load_cpu_model(backend, source)
    if backend == "onnxruntime-every-output":
        model = dataclasses.replace(model, backend=EveryOutput(model.backend))
    translate(model, ["warm up"], TranslateConfig(steps=1, height=size, width=size), image=guide_image(size))
    start = time.perf_counter()
    config = TranslateConfig(steps=steps, height=size, width=size)
    result = translate(model, ["a watercolor painting of a castle"], config, image=guide_image(size))
    return {"total": time.perf_counter() - start, "timings": result.stats.timings,
            "evals": result.stats.unet_evaluations}


def compare(name: str, torch_source: str, onnx_dir: Path, fused_dir: Path, size: int, steps: int) -> None:
    eager = in_child(__file__, "torch", torch_source, size, steps)
    ort = in_child(__file__, "onnxruntime", onnx_dir, size, steps)
    every = in_child(__file__, "onnxruntime-every-output", onnx_dir, size, steps)
    fused = in_child(__file__, "onnxruntime", fused_dir, size, steps)
    print(f"{name}, {size}x{size}, {steps} steps, {eager['evals']} UNet evaluations:")
    print(f"    {'stage':>9} {'torch':>9} {'onnxrt':>9} {'speed-up':>9} {'onnxrt, every output':>21} {'gain':>7} "
          f"{'onnxrt, fused attn':>19} {'gain':>7}")
    for stage, t in eager["timings"].items():
        o, e, f = ort["timings"][stage], every["timings"][stage], fused["timings"][stage]
        print(f"    {stage:>9} {t * 1000:>7.0f}ms {o * 1000:>7.0f}ms {t / o:>8.2f}x {e * 1000:>19.0f}ms {e / o:>6.2f}x "
              f"{f * 1000:>17.0f}ms {o / f:>6.2f}x")
    print(f"    {'total':>9} {eager['total']:>8.2f}s {ort['total']:>8.2f}s {eager['total'] / ort['total']:>8.2f}x "
          f"{every['total']:>20.2f}s {every['total'] / ort['total']:>6.2f}x {fused['total']:>18.2f}s "
          f"{ort['total'] / fused['total']:>6.2f}x")


def startup(backend: str, model: str, engines: str, image: Path) -> float:
    runs = []
    for _ in range(3):
        t0 = time.time()
        out = subprocess.run([sys.executable, "-c", STARTUP, backend, model, engines, str(image), str(t0)],
                             capture_output=True, text=True, check=True)
        runs.append(float(out.stdout.strip().splitlines()[-1]))
    return min(runs)


def export_in_child(source: str, out: Path, attention: str = "standard") -> None:
    code = ("import sys; from pathlib import Path; from pnp_trt.models import quiet_loading; quiet_loading()\n"
            "from pnp_trt.export.exporter import export_loaded, export_model\n"
            "from pnp_trt.random_models import random_model\n"
            "src, out, attention = sys.argv[1], Path(sys.argv[2]), sys.argv[3]\n"
            "if src == 'random-sd21': export_loaded(random_model('sd', 0), out, attention=attention)\n"
            "else: export_model(src, out, attention=attention)\n")
    subprocess.run([sys.executable, "-c", code, source, str(out), attention], check=True, capture_output=True)


def export_both(source: str, directory: Path) -> tuple[Path, Path]:
    """The standard and the fused-attention export of `source`."""
    standard, fused = directory / "standard", directory / "fused"
    directory.mkdir()
    export_in_child(source, standard)
    export_in_child(source, fused, "onnxruntime")
    return standard, fused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny-size", type=int, default=256)
    parser.add_argument("--tiny-steps", type=int, default=10)
    parser.add_argument("--sd21-size", type=int, default=256)
    parser.add_argument("--sd21-steps", type=int, default=4)
    parser.add_argument("--skip-sd21", action="store_true")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        answer_child(args.child, measure)
        return
    import onnxruntime
    import torch

    from pnp_trt.random_models import make_tiny_model

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), fp32; onnxruntime {onnxruntime.__version__} CPUExecutionProvider; "
          "each backend in its own process")
    with tempfile.TemporaryDirectory() as tmp:
        tiny = make_tiny_model(Path(tmp) / "tiny")
        tiny_onnx, tiny_fused = export_both(str(tiny), Path(tmp) / "tiny-onnx")
        compare("tiny model", str(tiny), tiny_onnx, tiny_fused, args.tiny_size, args.tiny_steps)
        image = Path(tmp) / "guide.png"
        guide_image(64).save(image)
        t_start, o_start = startup("torch", str(tiny), "", image), startup("onnxruntime", "", str(tiny_onnx), image)
        print(f"start-up to first UNet call (tiny, best of 3): torch {t_start:.2f}s, onnxruntime {o_start:.2f}s "
              f"({t_start / o_start:.1f}x)")
        if not args.skip_sd21:
            sd21_onnx, sd21_fused = export_both("random-sd21", Path(tmp) / "sd21-onnx")
            compare("SD 2.1-base shape, random weights", "random-sd21", sd21_onnx, sd21_fused, args.sd21_size,
                    args.sd21_steps)


if __name__ == "__main__":
    main()
