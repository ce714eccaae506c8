"""Test-only reference: PnP on SDXL written from DESIGN §1b the way the paper's code does it (a batch of three).

One UNet batch of (source, negative, target) per step, every call conditioned on the two text encoders'
penultimate hidden states (concatenated), the second encoder's pooled projection and the size conditioning;
injection by copying the source's tensors over the other two inside the batch. diffusers' and transformers' own
classes throughout; shares no code with pnp_trt.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

RESBLOCK = "up_blocks.0.resnets.1.conv2"
ATTENTION = re.compile(r"up_blocks\.(0\.attentions\.[12]|1\.attentions\.[012])"
                       r"\.transformer_blocks\.\d+\.attn1\.to_[qk]")
"""§1b's default: q and k of attn1 in every transformer block of up_blocks[0].attentions[1,2] and
up_blocks[1].attentions[0,1,2]."""


class PaperPnPXL:
    def __init__(self, model_dir: str, dtype: torch.dtype, alphas_cumprod: torch.Tensor | None = None):
        self.dtype = dtype
        load = dict(use_safetensors=True, torch_dtype=dtype)
        self.unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", **load).eval()
        self.vae = AutoencoderKL.from_pretrained(model_dir, subfolder="vae", **load).eval()
        self.encoders = [CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", **load).eval(),
                         CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2",
                                                                     **load).eval()]
        self.tokenizers = [CLIPTokenizer.from_pretrained(model_dir, subfolder=name)
                           for name in ("tokenizer", "tokenizer_2")]
        self.scheduler = DDIMScheduler.from_pretrained(model_dir, subfolder="scheduler")
        if alphas_cumprod is not None:
            self.scheduler.alphas_cumprod = alphas_cumprod.to(torch.float32)
            self.scheduler.final_alpha_cumprod = self.scheduler.alphas_cumprod[0]  # set_alpha_to_one: false
        self.inject = {"feature": False, "attention": False}
        self.size = (0, 0)
        hooked = 0
        for name, module in self.unet.named_modules():
            if name == RESBLOCK or ATTENTION.fullmatch(name):
                module.register_forward_hook(self._copy_source("feature" if name == RESBLOCK else "attention"))
                hooked += 1
        self.hooked = hooked

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
    def embed(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders, strict=True):
            ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]
        return torch.cat(states, dim=-1), pooled

    def unet_call(self, x: torch.Tensor, t: int, prompts: list[str]) -> torch.Tensor:
        embedded = [self.embed(p) for p in prompts]
        h, w = self.size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]] * len(prompts), dtype=self.dtype)
        return self.unet(x, t, encoder_hidden_states=torch.cat([e for e, _ in embedded]),
                         added_cond_kwargs={"text_embeds": torch.cat([p for _, p in embedded]),
                                            "time_ids": time_ids}).sample

    def step(self, eps: torch.Tensor, t: int, x: torch.Tensor) -> torch.Tensor:
        a = self.scheduler.alphas_cumprod.to(torch.float64)
        prev = t - self.scheduler.config.num_train_timesteps // self.scheduler.num_inference_steps
        a_prev = a[prev] if prev >= 0 else self.scheduler.final_alpha_cumprod.to(torch.float64)
        x0 = (x - (1 - a[t]).sqrt() * eps) / a[t].sqrt()
        return (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).to(self.dtype)

    @torch.no_grad()
    def invert(self, image: np.ndarray, steps: int) -> dict[int, torch.Tensor]:
        self.size = image.shape[-2:]
        x = torch.from_numpy(image).to(self.dtype) * 2 - 1
        z = self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor
        self.scheduler.set_timesteps(steps)
        a, latents = self.scheduler.alphas_cumprod.to(torch.float64), {}
        timesteps = [int(t) for t in reversed(self.scheduler.timesteps)]
        for i, t in enumerate(timesteps):
            a_prev = a[timesteps[i - 1]] if i > 0 else self.scheduler.final_alpha_cumprod.to(torch.float64)
            eps = self.unet_call(z, t, [""])
            x0 = (z - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
            z = (a[t].sqrt() * x0 + (1 - a[t]).sqrt() * eps).to(self.dtype)
            latents[t] = z
        return latents

    @torch.no_grad()
    def generate(self, noise: np.ndarray, prompt: str, scale: float, steps: int,
                 size: tuple[int, int]) -> dict[int, torch.Tensor]:
        self.size = size
        self.scheduler.set_timesteps(steps)
        x, latents = torch.from_numpy(noise).to(self.dtype), {}
        for t in self.scheduler.timesteps.tolist():
            latents[t] = x
            u, c = self.unet_call(torch.cat([x, x]), t, ["", prompt]).chunk(2)
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
            _, u, c = self.unet_call(torch.cat([latents[t], x, x]), t, ["", negative, prompt]).chunk(3)
            x = self.step(u + scale * (c - u), t, x)
        self.inject = {"feature": False, "attention": False}
        return x
