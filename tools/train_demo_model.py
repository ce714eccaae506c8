"""Train the demo model: the SD 2.1 topology at small widths, trained on the synthetic world of
`pnp_trt.demo.world` (flat shapes of named colours, captioned by the program that draws them).

Three stages, each seeded and resumable from --work (rerun the same command after a stop):
  1. the VAE, on 64 × 64 crops of 128 × 128 scenes (it is convolutional: crops teach it the whole picture);
  2. a bank of latents of fixed scenes, encoded once (the posterior mean, as pnp-trt encodes guidance);
  3. the UNet and the text encoder together, ε-prediction on SD 2.1's noise schedule, 10 % empty captions (for
     classifier-free guidance), with an exponential moving average of the weights, which is what is saved.

`--init-from DIR` goes on from an earlier demo model instead (its VAE kept, stage 3 only); `--pyramid-noise D`
trains stage 3 on multi-resolution noise, so that colours come from the prompt rather than from the inverted
noise. The shipped model's `training.json` records the commands that made it.

    python tools/train_demo_model.py --work /tmp/demo-train --out pnp_trt/demo/model
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pnp_trt.demo import world
from pnp_trt.fileio import staging_directory
from pnp_trt.random_models import SD21_SCHEDULER, model_index, text_encoder, tiny_unet_config, vae, write_clip_tokenizer

CHECKPOINT_EVERY = 250
UNET = {"batch": 32, "lr": 5e-4, "ema": 0.999}
TEXT_ENCODER = {"width": 64, "layers": 2, "heads": 4, "intermediate": 128}


def demo_unet_config() -> dict[str, Any]:
    """The SD 2.1 UNet topology (the tiny model's blocks) at widths a CPU trains in under an hour."""
    return {**tiny_unet_config(), "block_out_channels": [32, 64, 64, 64], "attention_head_dim": [2, 4, 4, 4],
            "cross_attention_dim": TEXT_ENCODER["width"], "sample_size": world.SIZE // 8}


def scenes_batch(seed: int, step: int, count: int) -> tuple[np.ndarray, list[str]]:
    """The `count` scenes of one step: a function of (seed, step) alone, so a resumed run sees the same data."""
    rng = np.random.default_rng([seed, step])
    scenes = [world.random_scene(rng) for _ in range(count)]
    return np.stack([s.draw() for s in scenes]), [s.caption() for s in scenes]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


class Progress:
    """One line every `every` steps: the step, the smoothed loss, speed and time left."""

    def __init__(self, stage: str, total: int, start: int, every: int = 50):
        self.stage, self.total, self.start, self.every = stage, total, start, every
        self.began, self.loss = time.monotonic(), float("nan")

    def update(self, step: int, loss: float) -> None:
        self.loss = loss if math.isnan(self.loss) else 0.98 * self.loss + 0.02 * loss
        done = step + 1 - self.start
        if (step + 1) % self.every == 0 or step + 1 == self.total:
            rate = done / (time.monotonic() - self.began)
            print(f"[{self.stage}] step {step + 1}/{self.total}  loss {self.loss:.5f}  {rate:.2f} steps/s  "
                  f"{(self.total - step - 1) / rate / 60:.1f} min left", flush=True)


def save_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> None:
    """Weights as safetensors, the optimizer as tensors-only torch data, the step as JSON; written then renamed."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(tmp / f"{name}.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state))
    if path.exists():
        for old in path.iterdir():
            old.unlink()
        path.rmdir()
    tmp.rename(path)


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> dict:
    for name, module in modules.items():
        module.load_state_dict(load_file(str(path / f"{name}.safetensors")))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))  # our own file, tensors only
    return json.loads((path / "state.json").read_text())


def train_vae(work: Path, seed: int, steps: int) -> Any:
    model = vae(full=False)
    model.register_to_config(sample_size=world.SIZE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    done = work / "vae"
    state = load_checkpoint(done, {"vae": model}, optimizer) if done.exists() else {"step": 0, "losses": []}
    progress = Progress("vae", steps, state["step"])
    for step in range(state["step"], steps):
        images, _ = scenes_batch(seed, step, 16)
        rng = np.random.default_rng([seed, step, 1])
        top, left = rng.integers(0, world.SIZE - 64 + 1, size=2)
        x = to_tensor(images[:, top:top + 64, left:left + 64])
        posterior = model.encode(x).latent_dist
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        reconstruction = model.decode(posterior.sample(generator)).sample
        loss = (reconstruction - x).abs().mean() + ((reconstruction - x) ** 2).mean() + 1e-6 * posterior.kl().mean()
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * (0.1 ** (step / steps))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        progress.update(step, loss.item())
        state["losses"].append(loss.item())
        if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == steps:
            save_checkpoint(done, {"vae": model}, optimizer, {"step": step + 1, "losses": state["losses"]})
    return model.eval().requires_grad_(False)


def latent_bank(work: Path, seed: int, autoencoder: Any, count: int) -> dict[str, Any]:
    """Latents (posterior mean, unscaled) and captions of `count` fixed scenes; written once, then read."""
    path = work / f"bank-{count}.safetensors"
    if path.exists():
        captions = json.loads(path.with_suffix(".json").read_text())
        return {"latents": load_file(str(path))["latents"], "captions": captions}
    latents, captions = [], []
    with torch.no_grad():
        for chunk in range(0, count, 256):
            images, texts = scenes_batch(seed + 1, chunk, min(256, count - chunk))
            latents.append(autoencoder.encode(to_tensor(images)).latent_dist.mean)
            captions += texts
            print(f"[bank] {chunk + len(texts)}/{count} scenes encoded", flush=True)
    bank = torch.cat(latents).contiguous()
    save_file({"latents": bank}, str(path))
    path.with_suffix(".json").write_text(json.dumps(captions))
    return {"latents": bank, "captions": captions}


def unet_lr(step: int, steps: int, decay_from: int | None) -> float:
    """200 warm-up steps, then constant; from `decay_from` on (if given) a cosine down to zero at `steps`. A run
    stopped before `decay_from` and resumed with more steps is the run it would have been from the start."""
    lr = UNET["lr"] * min(1.0, (step + 1) / 200)
    if decay_from is None or step < decay_from:
        return lr
    return lr * 0.5 * (1 + math.cos(math.pi * (step - decay_from) / max(1, steps - decay_from)))


def pyramid_noise(shape: torch.Size, generator: torch.Generator, discount: float) -> torch.Tensor:
    """Gaussian noise plus coarser Gaussian noise at every halving of the latent's side, weighted discount^level
    and rescaled to unit variance (multi-resolution "pyramid" noise): the flat colour regions of this world are
    low frequencies, which plain noise leaves readable at t = 999, so a model trained on it takes its colours
    from an inverted x_T and not from the prompt."""
    noise = torch.randn(shape, generator=generator)
    side, level = shape[-1], 1
    while side > 1:
        side //= 2
        coarse = torch.randn((*shape[:2], side, side), generator=generator)
        noise = noise + discount ** level * torch.nn.functional.interpolate(coarse, size=shape[-2:], mode="nearest")
        level += 1
    return noise / noise.std(dim=(1, 2, 3), keepdim=True)


def initial_models(tokenizer: Any, seed: int, init_from: Path | None) -> tuple[Any, Any]:
    """A fresh UNet and text encoder (seeded), or those of an earlier demo model to go on from."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    if init_from is not None:
        return (UNet2DConditionModel.from_pretrained(init_from / "unet", use_safetensors=True),
                CLIPTextModel.from_pretrained(init_from / "text_encoder", use_safetensors=True))
    torch.manual_seed(seed)
    return (UNet2DConditionModel(**demo_unet_config()),
            text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, **TEXT_ENCODER))


def train_unet(work: Path, seed: int, steps: int, bank: dict[str, Any], tokenizer: Any, scale: float,
               decay_from: int | None = None, pyramid: float | None = None, init_from: Path | None = None) -> tuple:
    unet, encoder = initial_models(tokenizer, seed, init_from)
    averages = {"unet": copy.deepcopy(unet), "text_encoder": copy.deepcopy(encoder)}
    parameters = list(unet.parameters()) + list(encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=UNET["lr"], weight_decay=0.01)
    modules = {"unet": unet, "text_encoder": encoder, "ema_unet": averages["unet"],
               "ema_text_encoder": averages["text_encoder"]}
    done = work / "unet"
    state = load_checkpoint(done, modules, optimizer) if done.exists() else {"step": 0, "losses": []}
    betas = torch.linspace(SD21_SCHEDULER["beta_start"] ** 0.5, SD21_SCHEDULER["beta_end"] ** 0.5, 1000,
                           dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0).float()
    ids = torch.from_numpy(np.stack([tokenizer(c, padding="max_length", max_length=77, truncation=True).input_ids
                                     for c in bank["captions"] + [""]]))
    latents = bank["latents"] * scale
    progress = Progress("unet", steps, state["step"])
    for step in range(state["step"], steps):
        rng = np.random.default_rng([seed, step, 2])
        rows = torch.from_numpy(rng.integers(0, len(latents), UNET["batch"]))
        dropped = torch.from_numpy(rng.random(UNET["batch"]) < 0.1)
        tokens = torch.where(dropped[:, None], ids[-1], ids[rows])
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        noise = (torch.randn(latents[rows].shape, generator=generator) if pyramid is None
                 else pyramid_noise(latents[rows].shape, generator, pyramid))
        t = torch.randint(0, 1000, (UNET["batch"],), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents[rows] + (1 - a).sqrt() * noise
        loss = ((unet(noisy, t, encoder(tokens).last_hidden_state).sample - noise) ** 2).mean()
        for group in optimizer.param_groups:
            group["lr"] = unet_lr(step, steps, decay_from)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = min(UNET["ema"], (1 + step) / (10 + step))
        with torch.no_grad():
            for average, live in ((averages["unet"], unet), (averages["text_encoder"], encoder)):
                for p_avg, p in zip(average.parameters(), live.parameters(), strict=True):
                    p_avg.lerp_(p, 1 - decay)
        progress.update(step, loss.item())
        state["losses"].append(loss.item())
        if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == steps:
            save_checkpoint(done, modules, optimizer, {"step": step + 1, "losses": state["losses"]})
    return averages["unet"], averages["text_encoder"], state["losses"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="checkpoints and the latent bank (resumable)")
    parser.add_argument("--out", type=Path, required=True, help="the diffusers directory to write (must not exist)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=2500)
    parser.add_argument("--unet-steps", type=int, default=5000)
    parser.add_argument("--lr-decay-from", type=int, default=None,
                        help="the UNet step from which its learning rate decays (cosine) to zero at the end")
    parser.add_argument("--scenes", type=int, default=32768, help="scenes in the latent bank")
    parser.add_argument("--pyramid-noise", type=float, default=None, metavar="DISCOUNT",
                        help="train on multi-resolution noise, each coarser level weighted by DISCOUNT^level")
    parser.add_argument("--init-from", type=Path, default=None,
                        help="go on from an earlier demo model's UNet, text encoder and VAE (no VAE stage)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.monotonic()
    args.work.mkdir(parents=True, exist_ok=True)
    earlier = None if args.init_from is None else json.loads((args.init_from / "training.json").read_text())
    if earlier is None:
        autoencoder = train_vae(args.work, args.seed, args.vae_steps)
        vae_loss = json.loads((args.work / "vae" / "state.json").read_text())["losses"][-1]
    else:
        from diffusers import AutoencoderKL
        autoencoder = AutoencoderKL.from_pretrained(args.init_from / "vae", use_safetensors=True).eval()
        vae_loss = earlier["final_vae_loss"]
    bank = latent_bank(args.work, args.seed, autoencoder, args.scenes)
    scale = float(1 / bank["latents"].std()) if args.init_from is None else autoencoder.config.scaling_factor
    autoencoder.register_to_config(scaling_factor=scale)
    with tempfile.TemporaryDirectory() as tmp_tokenizer:
        tokenizer = write_clip_tokenizer(Path(tmp_tokenizer) / "tokenizer", world.WORDS)
    unet, encoder, losses = train_unet(args.work, args.seed, args.unet_steps, bank, tokenizer, scale,
                                       args.lr_decay_from, args.pyramid_noise, args.init_from)
    with staging_directory(args.out) as tmp:
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        autoencoder.save_pretrained(tmp / "vae", safe_serialization=True)
        encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        write_clip_tokenizer(tmp / "tokenizer", world.WORDS)
        for config in (tmp / "unet" / "config.json", tmp / "vae" / "config.json"):  # not where --init-from was
            config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items()
                                          if k != "_name_or_path"}, indent=2, sort_keys=True) + "\n")
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD21_SCHEDULER, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(model_index(), indent=2))
        tail = losses[-200:]
        (tmp / "training.json").write_text(json.dumps({
            "command": "python tools/train_demo_model.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                if k not in ("work", "out") and v is not None),
            "seed": args.seed, "vae_steps": args.vae_steps, "unet_steps": args.unet_steps,
            "lr_decay_from": args.lr_decay_from, "scenes": args.scenes, "pyramid_noise": args.pyramid_noise,
            "init_from": earlier,
            "scaling_factor": scale, "final_unet_loss_mean_last_200": sum(tail) / len(tail),
            "final_vae_loss": vae_loss, "minutes_of_the_last_run": (time.monotonic() - began) / 60}, indent=2))
    print(f"wrote {args.out} in {(time.monotonic() - began) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
