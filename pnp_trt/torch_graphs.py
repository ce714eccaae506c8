"""The four graphs of `contract.graph_specs` as torch modules: run eagerly by the torch backend and
traced by the ONNX export, so both execute the same code."""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .contract import GATES, INJECTION_POINTS, captured_name
from .injection import PnPCall, install_hooks, pnp_call, release_hooks


class TextEncoderGraph(torch.nn.Module):
    """input_ids [B,77] → the encoder's last hidden state [B,77,D]."""

    def __init__(self, text_encoder: Any):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.text_encoder(input_ids).last_hidden_state,)


class VaeEncoderGraph(torch.nn.Module):
    """image in [0,1] → posterior mean × scaling factor (DESIGN §1, step 1)."""

    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        posterior = self.vae.encode(2 * image - 1).latent_dist
        return (posterior.mean * self.vae.config.scaling_factor,)


class VaeDecoderGraph(torch.nn.Module):
    """latent → image in [0,1] (DESIGN §1, step 4)."""

    def __init__(self, vae: Any):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor]:
        image = self.vae.decode(latent / self.vae.config.scaling_factor).sample
        return ((image / 2 + 0.5).clamp(0, 1),)


class PnPUNetGraph(torch.nn.Module):
    """The UNet with PnP's captured tensors as extra outputs and injected tensors + gates as inputs.

    Inputs in contract order: sample, timestep, encoder_hidden_states, the 17 injected tensors
    (batch 1; `None` is allowed eagerly when the gates are off), then the two gates.
    """

    def __init__(self, unet: Any):
        super().__init__()
        self.unet = unet
        install_hooks(unet)
        self.release_hooks = weakref.finalize(self, release_hooks, unet)
        """Removes this graph's claim on the hooks now (else when the graph is collected)."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *rest: torch.Tensor | None, keep: frozenset[str] | None = None) -> tuple[torch.Tensor | None, ...]:
        """`keep`: the captured outputs (by contract name) the caller reads; None (export): all. The others
        come back as None, never held past the layer that made them."""
        injected, gates = rest[:len(INJECTION_POINTS)], rest[len(INJECTION_POINTS):]
        call = PnPCall(
            injected={p.name: t for p, t in zip(INJECTION_POINTS, injected, strict=True) if t is not None},
            gates=dict(zip(GATES, gates, strict=True)),  # type: ignore[arg-type]
            keep=None if keep is None else frozenset(p.name for p in INJECTION_POINTS if captured_name(p) in keep),
        )
        with pnp_call(call):
            noise_pred = self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states).sample
        return (noise_pred, *(call.captured.get(p.name) for p in INJECTION_POINTS))

