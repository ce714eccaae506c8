"""Whole edits on a GPU, every path side by side in one process: torch eager, torch + CUDA graphs, ONNX Runtime
CUDA with IO binding, ± its CUDA graphs, on the standard export and on one with `--attention onnx`. SD 2.1-base
shapes with random weights (speed depends on shapes, not weight values; --model names a real one), fp16,
real-image guidance. `--family sdxl`: SDXL-base shapes instead, at 1024² by default.

Per path: a full edit with 1 prompt, a cached re-edit (source from the cache, a new prompt), 8 prompts in one
batch; UNet calls (the critical path) and evaluations, ms per call, achieved TFLOP/s in the UNet stages
(0.804 TFLOP per UNet sample at 512²), and the PSNR of its 1-prompt image against torch fp32 eager on the same
inputs. Prints each path and writes the whole record as JSON after each one (a cut-off run keeps what it had).
Without --onnx the fp16 graphs are first exported from the same random weights (in a child process, on the CPU).

    python bench/gpu.py --out bench/results/gpu.json [--family sd|sdxl] [--steps 50] [--size 512] [--onnx DIR]
        [--paths a,b]
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import guide_image

from pnp_trt.config import TranslateConfig
from pnp_trt.runtime.cache import SourceCache
from pnp_trt.runtime.translation import translate

UNET_TFLOP_PER_SAMPLE_512 = 0.804
UNET_STAGES = ("invert", "generate", "capture", "inject")
PROMPTS = [f"a painting of a castle, style {i}" for i in range(9)]
PATHS = ("torch-eager", "torch-cuda-graphs", "onnxruntime-cuda", "onnxruntime-cuda-graphs",
         "onnxruntime-cuda-attention-onnx", "onnxruntime-cuda-graphs-attention-onnx")
EXPORT = """
import sys, torch
from pathlib import Path
from pnp_trt.random_models import random_model
from pnp_trt.export.exporter import export_loaded
reports = export_loaded(random_model(sys.argv[3], 0), Path(sys.argv[1]), "fp16", attention=sys.argv[2])
print({r.name: r.worst for r in reports})
"""


def psnr(a: Any, b: Any) -> float | str:
    """dB between two 8-bit images ("identical" where they are: JSON has no infinity)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return "identical" if mse == 0 else float(10 * np.log10(255.0**2 / mse))


class Bench:
    def __init__(self, steps: int, size: int, family: str):
        self.steps, self.size, self.image, self.family = steps, size, guide_image(size), family

    def config(self, prompts: int, steps: int | None = None) -> TranslateConfig:
        return TranslateConfig(steps=steps or self.steps, height=self.size, width=self.size, prompt_batch_size=prompts)

    def edit(self, model: Any, prompts: list[str], cache: SourceCache | None = None,
             steps: int | None = None) -> tuple[float, Any]:
        start = time.perf_counter()
        result = translate(model, prompts, self.config(len(prompts), steps), image=self.image, cache=cache)
        return time.perf_counter() - start, result

    def reference(self, model: Any) -> dict[str, Any]:
        """The fp32 images every path is compared with (one warm-up step, one timed edit)."""
        self.edit(model, PROMPTS[:1], steps=1)
        full_s, full = self.edit(model, PROMPTS[:1])
        return {"full_edit_s": full_s, "unet_calls": full.stats.unet_calls, "images": full.images}

    def measure(self, model: Any, references: dict[str, list[Any]]) -> dict[str, Any]:
        """Warm up (graph capture, autotuning: every shape and injection state at 4 steps), then time."""
        self.edit(model, PROMPTS[:1], steps=4)
        self.edit(model, PROMPTS[:8], steps=4)
        full_s, full = self.edit(model, PROMPTS[:1])
        cache = SourceCache()
        self.edit(model, PROMPTS[:1], cache)
        cached_s, cached = self.edit(model, PROMPTS[1:2], cache)
        assert cached.source_cache_hit
        eight_s, eight = self.edit(model, PROMPTS[:8])
        stats = full.stats
        unet_s = sum(stats.timings.get(s, 0.0) for s in UNET_STAGES)
        record = {
            "full_edit_s": full_s, "cached_edit_s": cached_s, "eight_prompts_s": eight_s,
            "unet_calls": stats.unet_calls, "unet_evaluations": stats.unet_evaluations,
            "eight_prompts_unet_calls": eight.stats.unet_calls,
            "eight_prompts_unet_evaluations": eight.stats.unet_evaluations,
            "ms_per_unet_call": unet_s / stats.unet_calls * 1000,
            "tflops": stats.unet_evaluations * UNET_TFLOP_PER_SAMPLE_512 * (self.size / 512) ** 2 / unet_s
            if self.family == "sd" else None,  # the FLOP count is SD 2.1's
            "stages_ms": {k: v * 1000 for k, v in stats.timings.items()},
            "cached_stages_ms": {k: v * 1000 for k, v in cached.stats.timings.items()},
        }
        for name, images in references.items():
            record[f"psnr_vs_{name}"] = psnr(full.images[0], images[0])
        record["images"] = full.images
        return record


def environment() -> dict[str, Any]:
    import diffusers

    try:
        import onnxruntime
        ort_version = f"{onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})"
    except ImportError:
        ort_version = "absent"
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        driver = "unknown"
    return {"device": torch.cuda.get_device_name(), "driver": driver,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                         "onnxruntime": ort_version, "diffusers": diffusers.__version__, "numpy": np.__version__}}


class TorchModels:
    """Loads each precision once; the eager and CUDA-graph paths share the fp16 weights."""

    def __init__(self, model: str | None, family: str):
        self.model, self.family = model, family
        self.loaded: dict[torch.dtype, Any] = {}

    def open(self, dtype: torch.dtype, cuda_graphs: bool) -> Any:
        from pnp_trt.models import load_diffusers
        from pnp_trt.random_models import random_model
        from pnp_trt.runtime.torch_backend import open_torch

        if dtype not in self.loaded:
            cuda = torch.device("cuda")
            self.loaded[dtype] = load_diffusers(self.model, cuda, dtype) if self.model else \
                random_model(self.family, 0, cuda, dtype)
        return open_torch(self.loaded[dtype], cuda_graphs)

    def drop(self, dtype: torch.dtype) -> None:
        self.loaded.pop(dtype, None)
        free()


def export(directory: Path, family: str, attention: str = "standard") -> float:
    """Export the random SD 2.1- or SDXL-shaped model as fp16 graphs (log beside the directory); seconds taken."""
    start = time.perf_counter()
    print(f"== export to {directory} ({attention} attention)", flush=True)
    with directory.with_suffix(".log").open("w") as log:
        subprocess.run([sys.executable, "-c", EXPORT, str(directory), attention, family], stdout=log,
                       stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def exported(directory: Path) -> Path:
    if not (directory / "manifest.json").exists():
        raise RuntimeError(f"export failed: {directory.with_suffix('.log').read_text()[-1500:]}")
    return directory


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def run_path(name: str, open_model: Any, measure: Any, record: dict[str, Any],
             images_dir: Path | None) -> dict[str, Any] | None:
    """Measure one path; a failure is recorded (and printed) instead of ending the run."""
    print(f"== {name}", flush=True)
    try:
        start = time.perf_counter()
        model = open_model()
        result = measure(model)
        result["wall_s"] = time.perf_counter() - start
    except Exception as exc:  # a path that cannot run on this machine is a result too
        record["paths"][name] = {"error": f"{type(exc).__name__}: {str(exc)[:600]}"}
        print(f"   failed: {record['paths'][name]['error']}", flush=True)
        return None
    finally:
        model = None
        free()
    images = result.pop("images")
    if images_dir is not None:
        images[0].save(images_dir / f"{name}.png")
    record["paths"][name] = result
    print("   " + ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float | int)), flush=True)
    return {"images": images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON record to write")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--family", choices=("sd", "sdxl"), default="sd", help="random weights of SD 2.1-base or "
                        "SDXL-base shapes (ignored with --model)")
    parser.add_argument("--size", type=int, help="image side (default: 512, SDXL 1024)")
    parser.add_argument("--model", help="hub id or diffusers directory (default: random SD 2.1-base weights)")
    parser.add_argument("--onnx", type=Path, help="exported fp16 directory (default: export one to --export-to)")
    parser.add_argument("--export-to", type=Path, help="default: /tmp/pnp-trt-bench-FAMILY-fp16")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated subset of {', '.join(PATHS)}")
    parser.add_argument("--images", type=Path, help="save each path's 1-prompt image here")
    args = parser.parse_args()
    args.size = args.size or (1024 if args.family == "sdxl" else 512)
    args.export_to = args.export_to or Path(f"/tmp/pnp-trt-bench-{args.family}-fp16")
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py needs a CUDA GPU")
    paths = args.paths.split(",")
    export_s = None
    if args.onnx is None and any(p.startswith("onnxruntime") for p in paths):
        if args.model:
            raise SystemExit("with --model, export it first (`pnp-trt export --precision fp16`) and pass --onnx")
        export_s = export(args.export_to, args.family)
    onnx_dir = args.onnx or args.export_to
    attention_dir = onnx_dir.with_name(onnx_dir.name + "-attention-onnx")
    if any(p.endswith("attention-onnx") for p in paths) and not attention_dir.exists():
        export(attention_dir, args.family, "onnx")
    if args.images:
        args.images.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.steps, args.size, args.family)
    record: dict[str, Any] = {**environment(), "settings": {
        "model": args.model or f"random {'SDXL' if args.family == 'sdxl' else 'SD 2.1'}-base weights",
        "precision": "fp16", "size": args.size,
        "steps": args.steps, "guidance": "real image", "eight_prompts_batch": 8,
        "export_s": export_s}, "paths": {}}
    print(json.dumps({k: v for k, v in record.items() if k != "paths"}, indent=1), flush=True)

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")

    models = TorchModels(args.model, args.family)
    fp32 = run_path("torch-fp32-eager", lambda: models.open(torch.float32, False), bench.reference, record,
                    args.images)
    models.drop(torch.float32)
    references = {"fp32": fp32["images"]} if fp32 else {}
    save()
    openers = {
        "torch-eager": lambda: models.open(torch.float16, False),
        "torch-cuda-graphs": lambda: models.open(torch.float16, True),
        "onnxruntime-cuda": lambda: onnxruntime_model(exported(onnx_dir), False),
        "onnxruntime-cuda-graphs": lambda: onnxruntime_model(exported(onnx_dir), True),
        "onnxruntime-cuda-attention-onnx": lambda: onnxruntime_model(exported(attention_dir), False),
        "onnxruntime-cuda-graphs-attention-onnx": lambda: onnxruntime_model(exported(attention_dir), True),
    }
    for name in paths:
        result = run_path(name, openers[name], lambda model: bench.measure(model, references), record, args.images)
        if name == "torch-eager" and result:
            references["torch_fp16_eager"] = result["images"]
        if name == "torch-cuda-graphs":
            models.drop(torch.float16)
        save()
    print(f"wrote {args.out}")


def onnxruntime_model(directory: Path, cuda_graphs: bool) -> Any:
    from pnp_trt.runtime.onnxruntime_backend import open_onnxruntime

    return open_onnxruntime(directory, "cuda", cuda_graphs)


if __name__ == "__main__":
    main()
