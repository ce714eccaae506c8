"""Capture once, translate many (CPU, side by side in one run; UNet sample-evaluations counted too):

(a) one image × N prompts on the SD 2.1 UNet shape: one `pnp-trt translate` call with N prompts (capture
    shared, prompts batched) vs N independent `pnp-trt translate` runs — whole processes, start-up included;
(b) one prompt, identical settings: ours on ONNX Runtime vs the test-only batch-of-three reference (the
    paper's formulation, tests/reference_pnp.py) on torch eager, SD 2.1 UNet shape;
(c) our defaults (50 steps) vs the paper's default pipeline (999-step inversion + 999-step reconstruction,
    then 50 steps of batch-of-three sampling), both run for real on the tiny model.

    python bench/serving.py [--size 128] [--steps 10] [--prompts 8] [--tiny-size 256] [--skip-sd21]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import guide_image

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a watercolor painting of a castle", "a photo of a cat", "an oil painting", "a pencil sketch",
           "a lego model", "a bronze statue", "a castle at night", "a snowy landscape"]


def guide(path: Path, size: int) -> Path:
    guide_image(size).save(path)
    return path


def cli(*args: str) -> tuple[float, int]:
    """Wall time of one whole `pnp-trt` process and the UNet evaluations its closing line reports."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "pnp_trt.cli", *args], capture_output=True, text=True, check=True)
    evals = int(re.search(r"(\d+) UNet evaluations", out.stderr).group(1))
    return time.perf_counter() - start, evals


def many_prompts(model: Path, image: Path, size: int, steps: int, n: int, tmp: Path) -> None:
    common = ["--model", str(model), "--steps", str(steps), "--height", str(size), "--width", str(size)]
    prompts = [a for p in PROMPTS[:n] for a in ("-p", p)]
    batched_s, batched_evals = cli("translate", str(image), *prompts, "--out", str(tmp / "batched"), *common,
                                   "--prompt-batch-size", str(n))
    single = [cli("translate", str(image), "-p", p, "--out", str(tmp / f"single{i}.png"), *common)
              for i, p in enumerate(PROMPTS[:n])]
    single_s, single_evals = sum(s for s, _ in single), sum(e for _, e in single)
    print(f"(a) 1 image x {n} prompts, SD 2.1 shape {size}x{size}, {steps} steps, torch CPU, whole CLI processes:\n"
          f"    {n} independent runs: {single_s:.1f}s, {single_evals} UNet evaluations\n"
          f"    one run, {n} prompts (capture shared, batch {n}): {batched_s:.1f}s, {batched_evals} evaluations\n"
          f"    speed-up {single_s / batched_s:.2f}x (evaluations alone: {single_evals / batched_evals:.2f}x)")


CHILD = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[5])
from common import guide_image
from pnp_trt.images import load_guidance, to_array
which, model, image, steps = sys.argv[1], sys.argv[2], load_guidance(Path(sys.argv[3])), int(sys.argv[4])
size = (image.height, image.width)
if which == "reference":
    import torch
    from reference_pnp import PaperPnP
    paper = PaperPnP(model, torch.float32)
    def run(n):
        source = paper.invert(to_array(image, size), n)
        paper.translate(source, "a photo of a cat", "blurry", 7.5, n, 0.8, 0.5)
        return n + 3 * n
else:
    from pnp_trt.config import TranslateConfig
    from pnp_trt.runtime.loading import open_model
    from pnp_trt.runtime.translation import translate
    loaded = open_model("onnxruntime", None, Path(model))
    def run(n):
        cfg = TranslateConfig(steps=n, height=size[0], width=size[1], negative_prompt="blurry")
        return translate(loaded, ["a photo of a cat"], cfg, image=image).stats.unet_evaluations
run(1)
start = time.perf_counter()
evals = run(steps)
print(json.dumps({"seconds": time.perf_counter() - start, "evals": evals}))
"""


def child(which: str, model: Path, image: Path, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(model), str(image), str(steps),
                          str(ROOT / "tests")], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def one_prompt(model: Path, onnx: Path, image: Path, size: int, steps: int) -> None:
    reference, ours = child("reference", model, image, steps), child("ours", onnx, image, steps)
    print(f"(b) 1 prompt, SD 2.1 shape {size}x{size}, {steps} steps (translation only, models loaded):\n"
          f"    batch-of-three reference, torch eager: {reference['seconds']:.1f}s, {reference['evals']} evaluations\n"
          f"    ours, ONNX Runtime: {ours['seconds']:.1f}s, {ours['evals']} evaluations\n"
          f"    speed-up {reference['seconds'] / ours['seconds']:.2f}x "
          f"(evaluations alone: {reference['evals'] / ours['evals']:.2f}x)")


def paper_defaults(tiny: Path, image: Path, size: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch
    from reference_pnp import PaperPnP

    from pnp_trt.config import TranslateConfig
    from pnp_trt.images import load_guidance, to_array
    from pnp_trt.runtime.torch_backend import open_torch
    from pnp_trt.runtime.translation import translate

    picture = load_guidance(image)
    ours_model = open_torch(str(tiny), torch.device("cpu"), torch.float32)
    translate(ours_model, ["warm up"], TranslateConfig(steps=1, height=size, width=size), image=picture)
    start = time.perf_counter()
    ours = translate(ours_model, ["a photo of a cat"], TranslateConfig(height=size, width=size), image=picture)
    ours_s = time.perf_counter() - start
    paper = PaperPnP(str(tiny), torch.float32)
    start = time.perf_counter()
    inverted = paper.invert(to_array(picture, (size, size)), 999)
    paper.reconstruct(inverted, 999)
    paper.translate(inverted, "a photo of a cat", "ugly, blurry, black, low res, unrealistic", 7.5, 50, 0.8, 0.5)
    paper_s, paper_evals = time.perf_counter() - start, 999 + 999 + 3 * 50
    print(f"(c) defaults, tiny model {size}x{size}, torch CPU, one image and prompt:\n"
          f"    paper's pipeline (999 inversion + 999 reconstruction + 50x3): {paper_s:.1f}s, {paper_evals} evals\n"
          f"    ours (50 inversion + 40 capture + 50x2): {ours_s:.1f}s, {ours.stats.unet_evaluations} evals\n"
          f"    speed-up {paper_s / ours_s:.1f}x (evaluations alone: {paper_evals / ours.stats.unet_evaluations:.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tiny-size", type=int, default=256)
    parser.add_argument("--skip-sd21", action="store_true")
    args = parser.parse_args()
    import torch

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} CPU fp32")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        subprocess.run([sys.executable, "-m", "pnp_trt.cli", "make-tiny-model", str(tmp / "tiny")], check=True,
                       capture_output=True)
        paper_defaults(tmp / "tiny", guide(tmp / "tiny.png", args.tiny_size), args.tiny_size)
        if args.skip_sd21:
            return
        model, image = tmp / "sd21", guide(tmp / "guide.png", args.size)
        subprocess.run([sys.executable, "-m", "pnp_trt.cli", "make-tiny-model", "--full-size", str(model)],
                       check=True, capture_output=True)
        many_prompts(model, image, args.size, args.steps, args.prompts, tmp)
        subprocess.run([sys.executable, "-m", "pnp_trt.cli", "export", "--model", str(model), "--out",
                        str(tmp / "sd21-onnx")], check=True, capture_output=True)
        one_prompt(model, tmp / "sd21-onnx", image, args.size, args.steps)


if __name__ == "__main__":
    main()
