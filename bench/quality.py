"""Quality of PnP on the demo model, the paper's ablation and comparison in miniature: over N fixed synthetic
edits (colour, background and shape changes in turn), structure (IoU of the result's shapes with the ideal
result's) and prompt fidelity (the share of results whose shapes and background have the target colours, and
the target kind for shape edits), for

- PnP with the defaults, without any injection (inversion, then sampling with the target prompt), with features
  only, with attention only, and an SDEdit-style baseline (the guidance noised to a strength, then denoised
  with the target prompt) at two strengths, on torch fp32;
- PnP with the defaults on ONNX Runtime fp32 and fp16 exports of the same model.

    python bench/quality.py [--edits 60] [--steps 25] [--json bench/results/quality.json] [--strip docs/demo.png]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from pnp_trt.config import TranslateConfig
from pnp_trt.demo import MODEL, SETTINGS, judge
from pnp_trt.runtime.sampler import Sampler, join, start_noise
from pnp_trt.runtime.translator import Translator
from pnp_trt.schedule import classifier_free_guidance, ddim_step, sampling_timesteps

SIZE = {"height": 128, "width": 128}
ABLATIONS = {
    "PnP (defaults)": {},
    "no injection": {"feature_injection": 0.0, "attention_injection": 0.0},
    "features only": {"attention_injection": 0.0},
    "attention only": {"feature_injection": 0.0},
}
SDEDIT_STRENGTHS = (0.5, 0.75)


def pnp(translator: Translator, edit: judge.Edit, steps: int, settings: dict[str, Any]) -> np.ndarray:
    result = translator.translate(edit.prompt, edit.guidance.draw(), steps=steps, **SIZE, **SETTINGS, **settings)
    return np.asarray(result.images[0])


def sdedit(translator: Translator, edit: judge.Edit, steps: int, strength: float) -> np.ndarray:
    """SDEdit (Meng et al. 2022): the guidance's latent noised to the step `strength` of the way up, then DDIM
    with the target prompt and classifier-free guidance from there (the same scale PnP uses)."""
    model, scale = translator.model, TranslateConfig().guidance_scale
    sampler, arrays = Sampler(model, size=(128, 128)), model.backend
    ts = sampling_timesteps(model.schedule, steps)
    ts = ts[len(ts) - max(1, round(strength * len(ts))):]
    z0 = sampler.encode_image(arrays.asarray(edit.guidance.draw().transpose(2, 0, 1)[None] / np.float32(255)))
    a = float(model.schedule.alphas_cumprod[ts[0]])
    x = math.sqrt(a) * z0 + math.sqrt(1 - a) * arrays.asarray(start_noise(model, (128, 128), 0))
    embeddings = join(arrays, [sampler.encode_prompts([""]), sampler.encode_prompts([edit.prompt])])
    for t in ts:
        eps = sampler.unet(arrays.concat([x, x]), arrays.asarray(np.array([t, t], np.int64)), embeddings)
        eps = eps["noise_pred"]
        x = ddim_step(model.schedule, classifier_free_guidance(eps[:1], eps[1:], scale), x, t, steps)
    image = sampler.decode(x)[0].transpose(1, 2, 0)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


STRIP_EDITS = 6
"""Edits shown in the --strip picture (the first ones of the set)."""


def measure(name: str, edits: list[judge.Edit], run: Any, shown: dict[str, list[np.ndarray]]) -> dict[str, Any]:
    """Run and judge every edit; the first STRIP_EDITS results are kept in `shown[name]`."""
    began, scores = time.monotonic(), []
    for i, edit in enumerate(edits):
        image = run(edit)
        scores.append(judge.judge(edit, image))
        if i < STRIP_EDITS:
            shown.setdefault(name, []).append(image)
        if (i + 1) % 10 == 0 or i + 1 == len(edits):
            print(f"  {name}: {i + 1}/{len(edits)} edits, {time.monotonic() - began:.0f} s", flush=True)
    by_kind = {kind: judge.summary([s for s, e in zip(scores, edits, strict=True) if e.kind == kind])
               for kind in judge.EDIT_KINDS}
    return {"name": name, **judge.summary(scores), "by_kind": by_kind, "seconds": time.monotonic() - began}


def export(model: Path, precision: str, directory: Path) -> Path:
    from pnp_trt.export.exporter import export_model

    out = directory / f"demo-{precision}"
    export_model(str(model), out, precision)
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| variant | structure (IoU) | fidelity | colour edits | background edits | shape edits |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        kinds = " | ".join(f"{r['by_kind'][k]['structure']:.2f} / {r['by_kind'][k]['fidelity']:.0%}"
                           for k in judge.EDIT_KINDS)
        lines.append(f"| {r['name']} | {r['structure']:.3f} | {r['fidelity']:.0%} | {kinds} |")
    return "\n".join(lines)


def strip(edits: list[judge.Edit], shown: dict[str, list[np.ndarray]], path: Path) -> None:
    """One row per edit: the guidance, then each variant's result (the README's picture)."""
    from PIL import Image

    rows = [np.concatenate([edit.guidance.draw(), *(images[i] for images in shown.values())], axis=1)
            for i, edit in enumerate(edits[:STRIP_EDITS])]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path, optimize=True)
    print(f"wrote {path}: rows {[e.guidance.caption() + ' -> ' + e.prompt for e in edits[:STRIP_EDITS]]}; "
          f"columns guidance, {', '.join(shown)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=MODEL, help="a demo-world diffusers directory")
    parser.add_argument("--edits", type=int, default=60)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--strip", type=Path, help="also write a PNG of the first edits: guidance, PnP, no "
                                                   "injection, SDEdit")
    args = parser.parse_args()
    edits = judge.edits(args.edits)
    print(f"quality: {args.edits} edits, {args.steps} steps, 128x128, model {args.model}, {platform.processor() or ''}"
          f" {platform.machine()}", flush=True)
    torch_translator, shown = Translator.open("torch", model=args.model), {}
    rows = [measure(f"torch fp32, {name}", edits, lambda e, s=settings: pnp(torch_translator, e, args.steps, s),
                    shown) for name, settings in ABLATIONS.items()]
    rows += [measure(f"torch fp32, SDEdit strength {strength}", edits,
                     lambda e, k=strength: sdedit(torch_translator, e, args.steps, k), shown)
             for strength in SDEDIT_STRENGTHS]
    if args.strip:
        strip(edits, {k: v for k, v in shown.items() if "features only" not in k and "attention only" not in k},
              args.strip)
    with tempfile.TemporaryDirectory() as tmp:
        for precision in ("fp32", "fp16"):
            translator = Translator.open("onnxruntime", engines=export(args.model, precision, Path(tmp)))
            rows.append(measure(f"onnxruntime {precision}, PnP (defaults)", edits,
                                lambda e, t=translator: pnp(t, e, args.steps, {}), {}))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"edits": args.edits, "steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
