"""Which attention layers a TensorRT engine runs fused: read from the engine inspector's layer information
(written beside each plan as `<graph>.layers.json`) and the ONNX graph it was built from. Pure: no TensorRT.

An attention layer of the ONNX graph is its `Attention` node (`--attention onnx`) or its `Softmax` (standard
exports). In the engine it is
- fused: inside a layer whose type or tactic is an attention kernel (`IAttention`, fused MHA, flash);
- compiled: inside a layer TensorRT compiled as a region (Myelin), which does not say what it fused;
- unfused: a layer of its own (the score matrix is materialised);
- unseen: no layer names it (an engine built without layer names, or TensorRT renamed it)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import onnx

ATTENTION_NODES = ("Attention", "Softmax")
FUSED_KERNEL = re.compile(r"mha|attention|flash", re.IGNORECASE)
COMPILED_REGION = re.compile(r"myelin|kgen", re.IGNORECASE)
KINDS = ("fused", "compiled", "unfused", "unseen")


def attention_nodes(onnx_path: Path) -> list[str]:
    """Names of the graph's attention nodes (weights are not read)."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [node.name for node in graph.node if node.op_type in ATTENTION_NODES and node.name]


def engine_layers(information: str) -> list[Any]:
    """The layers of `get_engine_information(JSON)`: dicts (DETAILED verbosity) or names (LAYER_NAMES_ONLY)."""
    data = json.loads(information)
    layers = data.get("Layers", []) if isinstance(data, dict) else []
    return layers if isinstance(layers, list) else []


def _kind(layer: Any) -> str:
    if not isinstance(layer, dict):
        return "compiled"  # a name alone does not say which kernel ran
    kernel = f"{layer.get('LayerType', '')} {layer.get('TacticName', '')}"
    if FUSED_KERNEL.search(kernel):
        return "fused"
    return "compiled" if COMPILED_REGION.search(kernel) else "unfused"


def attention_fusion(information: str, nodes: list[str]) -> Counter[str]:
    """How many of the attention `nodes` fall in each of `KINDS`."""
    layers = [(json.dumps(layer), layer) for layer in engine_layers(information)]
    counts: Counter[str] = Counter({kind: 0 for kind in KINDS})
    for node in nodes:
        named = re.compile(re.escape(node) + r"(?!\w)")  # not /Softmax inside /Softmax_1
        holder = next((layer for text, layer in layers if named.search(text)), None)
        counts["unseen" if holder is None else _kind(holder)] += 1
    return counts


def layers_file(directory: Path, graph: str) -> Path:
    return directory / f"{graph}.layers.json"


def fusion_report(directory: Path, graphs: list[str]) -> list[str]:
    """One line per graph built in `directory` (from its layers file and its ONNX graph)."""
    return [describe(graph, attention_fusion(layers_file(directory, graph).read_text(),
                                             attention_nodes(directory / f"{graph}.onnx"))) for graph in graphs]


def describe(graph: str, counts: Counter[str]) -> str:
    """One line for `pnp-trt build`."""
    total = sum(counts.values())
    if not total:
        return f"{graph}: no attention layers"
    parts = ", ".join(f"{counts[kind]} {kind}" for kind in KINDS[1:] if counts[kind])
    return f"{graph}: {counts['fused']} of {total} attention layers fused" + (f" ({parts})" if parts else "")
