"""How much PnP's injection steers the demo model, and where its layout is lost: structure and fidelity
(`pnp_trt.demo.judge`) of the first N quality edits with no injection, the defaults, and injection at every
step (features, attention, both), at several guidance scales; and two ceilings on the same scenes, judged
against the guidance itself: the VAE alone (encode, decode) and inversion then sampling with the guidance's
own caption (no injection).

    python bench/injection_strength.py [--edits 12] [--steps 20] [--scales 3 7.5]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
from quality import pnp  # bench/quality.py, beside this script

from pnp_trt.demo import MODEL, judge
from pnp_trt.runtime.sampler import Sampler
from pnp_trt.runtime.translator import Translator

VARIANTS = {
    "no injection": {"feature_injection": 0.0, "attention_injection": 0.0},
    "PnP (defaults)": {},
    "features, every step": {"feature_injection": 1.0, "attention_injection": 0.0},
    "attention, every step": {"feature_injection": 0.0, "attention_injection": 1.0},
    "both, every step": {"feature_injection": 1.0, "attention_injection": 1.0},
}


def vae_round_trip(translator: Translator, edit: judge.Edit) -> np.ndarray:
    model = translator.model
    sampler, arrays = Sampler(model, size=(128, 128)), model.backend
    latent = sampler.encode_image(arrays.asarray(edit.guidance.draw().transpose(2, 0, 1)[None] / np.float32(255)))
    image = np.asarray(sampler.decode(latent)[0]).transpose(1, 2, 0)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def row(name: str, scores: list[judge.Score], began: float) -> None:
    summary = judge.summary(scores)
    print(f"| {name} | {summary['structure']:.3f} | {summary['fidelity']:.0%} | {time.monotonic() - began:.0f} s |",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scales", type=float, nargs="+", default=[3.0, 7.5])
    args = parser.parse_args()
    edits = judge.edits(args.edits)
    translator = Translator.open("torch", model=MODEL)
    print(f"injection strength: {args.edits} edits, {args.steps} steps, 128x128, guidance scales {args.scales}, "
          f"{platform.machine()}\n| variant | structure (IoU) | fidelity | time |\n|---|---|---|---|", flush=True)
    itself = [judge.Edit(e.guidance, e.guidance, "colour") for e in edits]  # judged against the guidance
    began = time.monotonic()
    row("ceiling: VAE encode + decode", [judge.judge(e, vae_round_trip(translator, e)) for e in itself], began)
    for scale in args.scales:
        began = time.monotonic()
        row(f"ceiling: own caption, no injection, scale {scale:g}",
            [judge.judge(e, pnp(translator, e, args.steps, {**VARIANTS["no injection"], "guidance_scale": scale}))
             for e in itself], began)
        for name, settings in VARIANTS.items():
            began = time.monotonic()
            row(f"{name}, scale {scale:g}", [judge.judge(e, pnp(translator, e, args.steps,
                                                                {**settings, "guidance_scale": scale}))
                                             for e in edits], began)


if __name__ == "__main__":
    main()
