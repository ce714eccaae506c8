"""`pnp-trt build`'s attention-fusion line, read from the engine inspector's JSON (written beside each plan) and
the ONNX graph. TensorRT cannot run here: the layer records below follow the inspector's documented shape
(`{"Layers": [...]}`, dicts at DETAILED verbosity with `Name`, `LayerType`, `TacticName` and `Metadata` holding
`[ONNX Layer: NAME]` entries separated by \x1e, as TensorRT Engine Explorer parses them; names alone at
LAYER_NAMES_ONLY); which kernel strings a real build prints is unconfirmed until TensorRT runs somewhere."""

from __future__ import annotations

import json
from pathlib import Path

from pnp_trt.engines.fusion import attention_fusion, attention_nodes, describe


def test_the_attention_nodes_of_an_export(exported: Path, tiny_model_dir: Path) -> None:
    """Every UNet attention layer's Softmax (standard export), one per layer."""
    import torch

    from pnp_trt.models import load_diffusers

    model = load_diffusers(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    nodes = attention_nodes(exported / "unet.onnx")
    assert len(nodes) == len(model.unet.attn_processors) and all(n.endswith("/Softmax") for n in nodes)


def test_each_attention_layer_is_classified_by_the_layer_holding_it() -> None:
    nodes = [f"/unet/up_blocks.{i}/attn1/Softmax" for i in range(5)]
    info = {"Layers": [
        {"Name": f"Reformatting CopyNode for Input Tensor 0 to {nodes[0]} + /unet/up_blocks.0/attn1/MatMul",
         "LayerType": "Reformat"},  # named after the layer it feeds: not that layer
        {"Name": f"{nodes[0]} + /unet/up_blocks.0/attn1/MatMul", "LayerType": "CaskFlashAttention", "TacticName": ""},
        {"Name": "fused", "LayerType": "gemm", "TacticName": "sm90_fmha_v2_flash",
         "Metadata": f"[ONNX Layer: /x/MatMul]\x1e[ONNX Layer: {nodes[1]}]"},
        {"Name": f"{{ForeignNode[/unet/up_blocks.2/attn1/to_q/MatMul...{nodes[2]}]}}", "LayerType": "Myelin"},
        {"Name": nodes[3], "LayerType": "SoftMax", "TacticName": "0x1"},
        {"Name": f"{nodes[3]} [profile 1]", "LayerType": "CaskFlashAttention"},  # another profile's repeat
        {"Name": nodes[4] + "_1", "LayerType": "CaskFlashAttention"},  # another node's name: not nodes[4]
    ]}
    counts = attention_fusion(json.dumps(info), nodes)
    assert dict(counts) == {"fused": 2, "compiled": 1, "unfused": 1, "unseen": 1}
    assert describe("unet", counts) == ("unet: 2 of 5 attention layers fused (1 compiled (may be fused), "
                                        "1 unfused, 1 unseen)")
    names_only = attention_fusion(json.dumps({"Layers": [nodes[0]]}), nodes[:1])
    assert names_only["compiled"] == 1 and describe("vae", attention_fusion("{}", [])) == "vae: no attention layers"
