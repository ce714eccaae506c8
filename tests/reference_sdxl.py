"""Test-only reference: PnP on SDXL written from DESIGN §1b the way the paper's code does it (a batch of three).

The SD reference's loops (`reference_pnp.PaperPnP`) with SDXL's conditioning in every UNet call: the two text
encoders' penultimate hidden states (concatenated), the second encoder's pooled projection and the size
conditioning; §1b's injection points. diffusers' and transformers' own classes throughout; shares no code with
pnp_trt.
"""

from __future__ import annotations

import re

import torch
from reference_pnp import PaperPnP
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

RESBLOCK = "up_blocks.0.resnets.1.conv2"
ATTENTION = re.compile(r"up_blocks\.(0\.attentions\.[12]|1\.attentions\.[012])"
                       r"\.transformer_blocks\.\d+\.attn1\.to_[qk]")
"""§1b's default: q and k of attn1 in every transformer block of up_blocks[0].attentions[1,2] and
up_blocks[1].attentions[0,1,2]."""


class PaperPnPXL(PaperPnP):
    def load_text(self, model_dir: str, load: dict) -> None:
        self.encoders = [CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", **load).eval(),
                         CLIPTextModelWithProjection.from_pretrained(model_dir, subfolder="text_encoder_2",
                                                                     **load).eval()]
        self.tokenizers = [CLIPTokenizer.from_pretrained(model_dir, subfolder=name)
                           for name in ("tokenizer", "tokenizer_2")]

    def injected(self, module: str) -> str | None:
        return "feature" if module == RESBLOCK else "attention" if ATTENTION.fullmatch(module) else None

    @torch.no_grad()
    def embed_xl(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders, strict=True):
            ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]
        return torch.cat(states, dim=-1), pooled

    def run(self, x: torch.Tensor, t: int, prompts: list[str]) -> torch.Tensor:
        embedded = [self.embed_xl(p) for p in prompts]
        h, w = (side * 8 for side in x.shape[-2:])  # the output size: original = target, no crop
        time_ids = torch.tensor([[h, w, 0, 0, h, w]] * len(prompts), dtype=self.dtype)
        return self.unet(x, t, encoder_hidden_states=torch.cat([e for e, _ in embedded]),
                         added_cond_kwargs={"text_embeds": torch.cat([p for _, p in embedded]),
                                            "time_ids": time_ids}).sample
