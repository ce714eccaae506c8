"""Attention exported as one fused node: the ONNX standard's `Attention` (opset 23, `--attention onnx`) or ONNX
Runtime's `com.microsoft.MultiHeadAttention` (`--attention onnxruntime`).

The standard export spells attention as MatMul → Softmax → MatMul, which ONNX Runtime runs as written: the
whole [batch·heads, S, S] score matrix is materialised, 1 GiB per head and sample at 1024² (S = 16,384
latent pixels). A fused node runs a memory-efficient (flash) kernel on the CPU and on CUDA. TensorRT parses
`Attention` into its fused `IAttention` layer from 10.14 on, and cannot parse `MultiHeadAttention` at all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import PnPError

FUSED_OPS = {"onnx": "Attention", "onnxruntime": "MultiHeadAttention"}
"""The node each fused `--attention` writes."""
PLACEHOLDER_DOMAIN = "pnp_trt.newer_onnx"
"""Where standard ONNX ops newer than the TorchScript exporter's opset 20 are traced; `clean_graph` moves them
to the standard domain and raises the graph's opset (`promote_newer_ops`)."""
FLOAT = 1
"""onnx.TensorProto.FLOAT: `Attention`'s softmax_precision, so an fp16 export needs no fp32 island around it."""


class FusedAttention(torch.autograd.Function):
    """softmax(q kᵀ/√d) v over `heads` heads of [B, S, heads·d] inputs; each subclass traces it as its node."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (heads, -1)).transpose(1, 2)

        return F.scaled_dot_product_attention(split(query), split(key), split(value)).transpose(1, 2).flatten(2)


class OnnxAttention(FusedAttention):
    """Traced as ONNX `Attention` (opset 23) on 3-D inputs: q/kv_num_heads split the heads, the default scale
    is 1/√d, the softmax runs in fp32 whatever the inputs' precision."""

    @staticmethod
    def symbolic(g: Any, query: Any, key: Any, value: Any, heads: int) -> Any:
        out = g.op(f"{PLACEHOLDER_DOMAIN}::{FUSED_OPS['onnx']}", query, key, value, q_num_heads_i=heads,
                   kv_num_heads_i=heads, softmax_precision_i=FLOAT)
        out.setType(query.type())  # [B, S, heads·d], as the query (SD's value width equals the query's)
        return out


class OrtMultiHeadAttention(FusedAttention):
    """Traced as ONNX Runtime's `com.microsoft.MultiHeadAttention` on 3-D inputs."""

    @staticmethod
    def symbolic(g: Any, query: Any, key: Any, value: Any, heads: int) -> Any:
        out = g.op(f"com.microsoft::{FUSED_OPS['onnxruntime']}", query, key, value, num_heads_i=heads)
        out.setType(query.type())
        return out


TRACED_AS = {"onnx": OnnxAttention, "onnxruntime": OrtMultiHeadAttention}


class FusedAttentionProcessor:
    """A diffusers attention processor computing what `AttnProcessor2_0` does for Stable Diffusion's
    attention layers (self, cross, and the VAE's spatial one), with the core traced as one node of `attention`.
    `to_q`/`to_k` stay module calls, so PnP's hooks capture and inject q and k as before."""

    def __init__(self, attention: str):
        self.attention, self.core = attention, TRACED_AS[attention]

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 **unused: Any) -> torch.Tensor:
        if attention_mask is not None or attn.spatial_norm is not None or attn.norm_q is not None:
            raise PnPError(f"--attention {self.attention} supports Stable Diffusion 1.x/2.x attention only; "
                           "export with --attention standard")
        residual, spatial = hidden_states, hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        out = self.core.apply(attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context), attn.heads)
        out = attn.to_out[1](attn.to_out[0](out))
        if spatial:
            out = out.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@contextlib.contextmanager
def attention_for_export(attention: str, *models: Any) -> Iterator[None]:
    """Inside the block the models' attention layers trace as `attention` says; their own processors are put
    back after, whatever happens."""
    if attention == "standard":
        yield
        return
    saved = [dict(model.attn_processors) for model in models]
    try:
        for model in models:
            model.set_attn_processor(FusedAttentionProcessor(attention))
        yield
    finally:
        for model, processors in zip(models, saved, strict=True):
            model.set_attn_processor(processors)
