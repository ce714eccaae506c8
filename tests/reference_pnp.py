"""Test-only reference: PnP written from DESIGN §1 the way the paper's code does it.

One UNet batch of three (source, negative, target) per step; injection by copying the source's
tensors over the other two inside the batch; diffusers' own tokenizer, text encoder, VAE and
scheduler timesteps. Shares no code with pnp_trt's sampler, schedule or injection modules.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

RESBLOCK = "up_blocks.1.resnets.1.conv2"
ATTENTION = [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1.{w}"
             for b, layers in ((1, (1, 2)), (2, (0, 1, 2)), (3, (0, 1, 2))) for a in layers for w in ("to_q", "to_k")]


class PaperPnP:
    def __init__(self, model_dir: str, dtype: torch.dtype, alphas_cumprod: torch.Tensor | None = None):
        """`alphas_cumprod`: float32 ᾱ to use instead of the scheduler's own (see `test_parity.paper64`)."""
        self.dtype = dtype
        load = dict(use_safetensors=True, torch_dtype=dtype)
        self.unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", **load).eval()
        self.vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", **load).eval()
        self.load_text(model_dir, load)
        self.scheduler = DDIMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        if alphas_cumprod is not None:
            self.scheduler.alphas_cumprod = alphas_cumprod.to(torch.float32)
            if not self.scheduler.config.set_alpha_to_one:
                self.scheduler.final_alpha_cumprod = self.scheduler.alphas_cumprod[0]
        self.inject = {"feature": False, "attention": False}
        self.hooked = 0
        for name, module in self.unet.named_modules():
            kind = self.injected(name)
            if kind is not None:
                module.register_forward_hook(self._copy_source(kind))
                self.hooked += 1

    def load_text(self, model_dir: str, load: dict) -> None:
        self.text_encoder = CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", **load).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer")

    def injected(self, module: str) -> str | None:
        """Which injection a module's output takes part in (DESIGN §1's layers), if any."""
        return "feature" if module == RESBLOCK else "attention" if module in ATTENTION else None

    def _copy_source(self, kind: str):
        def hook(module, args, output):
            if not self.inject[kind]:
                return None
            output = output.clone()
            output[1] = output[0]
            output[2] = output[0]
            return output
        return hook

    @torch.no_grad()
    def embed(self, prompt: str) -> torch.Tensor:
        ids = self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids)[0]

    def run(self, x: torch.Tensor, t: int, prompts: list[str]) -> torch.Tensor:
        """One UNet call, sample i conditioned on prompts[i]."""
        return self.unet(x, t, encoder_hidden_states=torch.cat([self.embed(p) for p in prompts])).sample

    def alphas(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(torch.float64)

    def step(self, eps: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        """DDIM eta 0, epsilon prediction, float64 coefficients."""
        a = self.alphas()
        prev = t - self.scheduler.config.num_train_timesteps // self.scheduler.num_inference_steps
        a_t = a[t]
        a_prev = a[prev] if prev >= 0 else self.scheduler.final_alpha_cumprod.to(torch.float64)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        return (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).to(self.dtype)

    @torch.no_grad()
    def invert(self, image: np.ndarray, steps: int) -> dict[int, torch.Tensor]:
        x = torch.from_numpy(image).to(self.dtype) * 2 - 1
        z = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor
        self.scheduler.set_timesteps(steps)
        a, latents = self.alphas(), {}
        timesteps = [int(t) for t in reversed(self.scheduler.timesteps)]
        for i, t in enumerate(timesteps):
            a_prev = a[timesteps[i - 1]] if i > 0 else self.scheduler.final_alpha_cumprod.to(torch.float64)
            eps = self.run(z, t, [""])
            x0 = (z - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
            z = (a[t].sqrt() * x0 + (1 - a[t]).sqrt() * eps).to(self.dtype)
            latents[t] = z
        return latents

    @torch.no_grad()
    def reconstruct(self, latents: dict[int, torch.Tensor], steps: int) -> torch.Tensor:
        """The paper's preprocessing also DDIM-samples the inverted latent back with the empty prompt."""
        self.scheduler.set_timesteps(steps)
        timesteps = self.scheduler.timesteps.tolist()
        x = latents[timesteps[0]]
        for t in timesteps:
            x = self.step(self.run(x, t, [""]), t, x)
        return x

    @torch.no_grad()
    def generate(self, noise: np.ndarray, prompt: str, scale: float, steps: int) -> dict[int, torch.Tensor]:
        self.scheduler.set_timesteps(steps)
        x, latents = torch.from_numpy(noise).to(self.dtype), {}
        for t in self.scheduler.timesteps.tolist():
            latents[t] = x
            u, c = self.run(torch.cat([x, x]), t, ["", prompt]).chunk(2)
            x = self.step(u + scale * (c - u), t, x)
        return latents

    @torch.no_grad()
    def translate(self, latents: dict[int, torch.Tensor], prompt: str, negative: str, scale: float, steps: int,
                  tau_f: float, tau_a: float) -> torch.Tensor:
        self.scheduler.set_timesteps(steps)
        timesteps = self.scheduler.timesteps.tolist()
        x = latents[timesteps[0]]
        for i, t in enumerate(timesteps):
            self.inject["feature"] = i < int(steps * tau_f)
            self.inject["attention"] = i < int(steps * tau_a)
            _, u, c = self.run(torch.cat([latents[t], x, x]), t, ["", negative, prompt]).chunk(3)
            x = self.step(u + scale * (c - u), t, x)
        self.inject = {"feature": False, "attention": False}
        return x
