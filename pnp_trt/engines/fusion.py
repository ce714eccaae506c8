"""Which attention layers a TensorRT engine runs fused: read from the engine inspector's layer information
(written beside each plan as `<graph>.layers.json`) and the ONNX graph it was built from. Pure: no TensorRT.

An attention layer of the ONNX graph is its `Attention` node (`--attention onnx`) or its `Softmax` (standard
exports). In the engine it is
- fused: inside a layer whose type or tactic is an attention kernel (`IAttention`, fused MHA, flash);
- compiled: inside a region TensorRT compiled (Myelin, kgen), which may well be fused but does not say;
- unfused: a layer of its own (the score matrix is materialised);
- unseen: no layer names it (an engine built without layer names, or TensorRT renamed it).
A node is found by its exact name in a layer's ONNX metadata (`[ONNX Layer: NAME]`) or its `+`-joined name;
reformatting copies (named after the layer they feed) and other profiles' repeats do not count, and of the
layers naming a node the most fused one decides. Which strings TensorRT prints for its attention kernels is
unconfirmed until a first GPU run."""

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
NOT_COMPUTE = re.compile(r"^Reformatting CopyNode|\[profile [1-9]|^(NoOp|Signal|Wait)\b", re.IGNORECASE)
METADATA_NAME = re.compile(r"\[ONNX Layer: ([^\]\x1e]+)\]")


def attention_nodes(onnx_path: Path) -> list[str]:
    """Names of the graph's attention nodes (weights are not read)."""
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return [node.name for node in graph.node if node.op_type in ATTENTION_NODES and node.name]


def engine_layers(information: str) -> list[Any]:
    """The layers of `get_engine_information(JSON)`: dicts (DETAILED verbosity) or names (LAYER_NAMES_ONLY)."""
    data = json.loads(information, strict=False)  # layer names may hold control characters
    layers = data.get("Layers", []) if isinstance(data, dict) else []
    return layers if isinstance(layers, list) else []


def _kind(layer: Any) -> str:
    if not isinstance(layer, dict):
        return "compiled"  # a name alone does not say which kernel ran
    kernel = f"{layer.get('LayerType', '')} {layer.get('TacticName', '')}"
    if FUSED_KERNEL.search(kernel):
        return "fused"
    return "compiled" if COMPILED_REGION.search(kernel) else "unfused"


def _names(layer: Any) -> set[str]:
    """The ONNX node names a layer says it computes (its metadata, else its `+`-joined name)."""
    if not isinstance(layer, dict):
        return {part.strip() for part in str(layer).split(" + ")}
    found = set(METADATA_NAME.findall(str(layer.get("Metadata", ""))))
    name = str(layer.get("Name", "")).removeprefix("{ForeignNode[").removesuffix("]}")  # Myelin: [first...last]
    found |= {part.strip() for joined in name.split(" + ") for part in joined.split("...")}
    return found


def attention_fusion(information: str, nodes: list[str]) -> Counter[str]:
    """How many of the attention `nodes` fall in each of `KINDS`."""
    layers = [layer for layer in engine_layers(information)
              if not NOT_COMPUTE.search(str(layer.get("Name", "")) if isinstance(layer, dict) else str(layer))]
    holders: dict[str, list[Any]] = {}
    for layer in layers:
        for name in _names(layer):
            holders.setdefault(name, []).append(layer)
    counts: Counter[str] = Counter({kind: 0 for kind in KINDS})
    for node in nodes:
        kinds = [_kind(layer) for layer in holders.get(node, [])]
        counts[min(kinds, key=KINDS.index) if kinds else "unseen"] += 1
    return counts


def layers_file(directory: Path, graph: str) -> Path:
    return directory / f"{graph}.layers.json"


def fusion_report(directory: Path, graphs: list[str]) -> list[str]:
    """One line per graph built in `directory` (from its layers file and its ONNX graph)."""
    return [describe(graph, attention_fusion(layers_file(directory, graph).read_text(),
                                             attention_nodes(directory / f"{graph}.onnx")))
            if layers_file(directory, graph).is_file() else f"{graph}: no layer information"
            for graph in graphs]


def describe(graph: str, counts: Counter[str]) -> str:
    """One line for `pnp-trt build`."""
    total = sum(counts.values())
    if not total:
        return f"{graph}: no attention layers"
    parts = ", ".join(f"{counts[kind]} {'compiled (may be fused)' if kind == 'compiled' else kind}"
                      for kind in KINDS[1:] if counts[kind])
    return f"{graph}: {counts['fused']} of {total} attention layers fused" + (f" ({parts})" if parts else "")
