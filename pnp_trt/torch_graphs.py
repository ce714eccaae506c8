"""The four graphs of `contract.graph_specs` as torch modules: run eagerly by the torch backend and
traced by the ONNX export, so both execute the same code."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .contract import GATES, ModelDims, captured_name, conditioning_specs
from .injection import PnPCall, install_hooks, pnp_call, release_hooks


class TextEncoderGraph(torch.nn.Module):
    """One token-id input per text encoder [B,77] → the embeddings [B,77,D] (the encoders' hidden states the
    family reads, concatenated: SDXL's 768 + 1280), and for SDXL the last encoder's pooled, projected output."""

    def __init__(self, text_encoders: list[Any], dims: ModelDims):
        super().__init__()
        self.text_encoders = torch.nn.ModuleList(text_encoders)
        self.family = dims.model_family

    def forward(self, *input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        penultimate = self.family.text_layer == "penultimate"
        states: list[torch.Tensor] = []
        pooled: Any = None
        for encoder, ids in zip(self.text_encoders, input_ids, strict=True):
            out = encoder(ids, output_hidden_states=penultimate)
            states.append(out.hidden_states[-2] if penultimate else out.last_hidden_state)
            pooled = getattr(out, "text_embeds", None)
        embeddings = torch.cat(states, dim=-1) if len(states) > 1 else states[0]
        return (embeddings, pooled) if self.family.pooled else (embeddings,)


class VaeEncoderGraph(torch.nn.Module):
    """image in [0,1] → posterior mean × scaling factor (DESIGN §1, step 1)."""

    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        posterior = self.vae.encode(2 * image.to(self.vae.dtype) - 1).latent_dist  # an fp32 VAE in an fp16 run
        return ((posterior.mean * self.vae.config.scaling_factor).to(image.dtype),)


class VaeDecoderGraph(torch.nn.Module):
    """latent → image in [0,1] (DESIGN §1, step 4)."""

    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor]:
        image = self.vae.decode((latent / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        return ((image / 2 + 0.5).clamp(0, 1).to(latent.dtype),)


class PnPUNetGraph(torch.nn.Module):
    """The UNet with PnP's captured tensors as extra outputs and injected tensors + gates as inputs.

    Inputs in contract order: sample, timestep, the conditioning (encoder_hidden_states; SDXL: text_embeds,
    time_ids), the injected tensors (batch 1; `None` is allowed eagerly when the gates are off), then the two gates.
    """

    def __init__(self, unet: Any, dims: ModelDims):
        super().__init__()
        self.unet, self.points = unet, dims.points
        self.conditioning = [t.name for t in conditioning_specs(dims)]
        install_hooks(unet, self.points)
        self.release_hooks = weakref.finalize(self, release_hooks, unet)
        """Removes this graph's claim on the hooks now (else when the graph is collected)."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, *rest: torch.Tensor | None,
                keep: frozenset[str] | None = None) -> tuple[torch.Tensor | None, ...]:
        """`keep`: the captured outputs (by contract name) the caller reads; None (export): all. The others
        come back as None, never held past the layer that made them."""
        points, n = self.points, len(self.conditioning)
        conditioning = dict(zip(self.conditioning, rest[:n], strict=True))
        injected, gates = rest[n:n + len(points)], rest[n + len(points):]
        call = PnPCall(
            injected={p.name: t for p, t in zip(points, injected, strict=True) if t is not None},
            gates=dict(zip(GATES, gates, strict=True)),  # type: ignore[arg-type]
            keep=None if keep is None else frozenset(p.name for p in points if captured_name(p) in keep),
        )
        hidden = conditioning.pop("encoder_hidden_states")
        with pnp_call(call):  # SDXL's text_embeds and time_ids are diffusers' added_cond_kwargs
            noise_pred = self.unet(sample, timestep, encoder_hidden_states=hidden,
                                   added_cond_kwargs=conditioning or None).sample
        return (noise_pred, *(call.captured.get(p.name) for p in points))

