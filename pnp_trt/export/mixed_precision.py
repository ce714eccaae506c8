"""fp16 exports with fp32 islands that really are fp32 (DESIGN §2): normalization statistics, softmax, the
timestep embedding and the attention scale are computed in fp32, and no value crosses between two islands
through fp16 (a strongly typed TensorRT network would honour that round trip, and it overflows past 65504)."""

from __future__ import annotations

import re
from pathlib import Path

import onnx

from ..contract import FLOAT, GraphSpec
from .onnx_graph import save_model

FP32_OPS = ["InstanceNormalization", "GroupNormalization", "LayerNormalization", "Softmax", "ReduceMean", "Pow",
            "Sqrt", "Sin", "Cos", "Exp", "Erf"]
"""Kept in fp32 in fp16 exports: normalization, softmax and the timestep embedding (DESIGN §2)."""


NORM_SCOPE = re.compile(r"/(norm[^/]*|group_norm|conv_norm_out)/")
"""Nodes inside normalization modules (their two-pass GroupNorm ops) stay fp32 as a whole."""
TIME_SCOPE = re.compile(r"/(add_)?time_proj/")
"""The sinusoidal timestep embedding (and SDXL's of its size conditioning, `add_time_proj`): t·freq reaches 1,000
rad (sizes: 1,536), where fp16 steps are 0.5 apart."""


def fp32_nodes(graph: onnx.GraphProto) -> list[str]:
    """Nodes kept in fp32 as a whole: normalization modules, the timestep's way into its sinusoidal
    embedding (diffusers computes it in fp32 too) and arithmetic on shapes (e.g. the attention scale 1/√d).
    `graph` must be topologically sorted (`clean_graph` sorts it)."""
    nodes = list(graph.node)
    time_proj = {n.name for n in nodes if TIME_SCOPE.search(n.name)}
    names = {n.name for n in nodes if NORM_SCOPE.search(n.name)} | time_proj
    names |= _downstream(nodes, {"timestep", "time_ids"}) & _upstream(nodes, time_proj)
    return sorted(names | _shape_arithmetic(graph))


def _downstream(nodes: list[onnx.NodeProto], tensors: set[str]) -> set[str]:
    reached, names = set(tensors), set()
    for node in nodes:
        if reached.intersection(node.input):
            names.add(node.name)
            reached.update(node.output)
    return names


def _upstream(nodes: list[onnx.NodeProto], targets: set[str]) -> set[str]:
    needed = {i for n in nodes if n.name in targets for i in n.input}
    names = set()
    for node in reversed(nodes):
        if needed.intersection(node.output):
            names.add(node.name)
            needed.update(node.input)
    return names


def _shape_arithmetic(graph: onnx.GraphProto) -> set[str]:
    """Nodes computing only from shapes and constants."""
    constant = {t.name for t in graph.initializer}
    constant |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    derived: set[str] = set()
    names = set()
    for node in graph.node:
        inputs = [i for i in node.input if i]
        if node.op_type == "Shape" or (inputs and derived.intersection(inputs)
                                       and all(i in derived or i in constant for i in inputs)):
            names.add(node.name)
            derived.update(node.output)
    return names


def to_mixed_fp16(path: Path, spec: GraphSpec, fp32_inside: bool = False) -> None:
    """fp16 weights and activations, fp32 where `FP32_OPS` and `fp32_nodes` need the range (`fp32_inside`: every
    node, fp16 only at the graph's I/O — SDXL's VAE, which overflows in fp16); fp32 I/O stays where the contract
    says float32 (e.g. the timestep). The types come from `clean_graph`'s path-based shape inference: the
    converter's own in-memory inference cannot serialize an fp32 UNet past 2 GB (SD 2.1)."""
    import onnx_graphsurgeon as gs
    from onnxruntime.transformers.float16 import convert_float_to_float16

    keep = [t.name for t in spec.inputs + spec.outputs if t.dtype not in (FLOAT, "bool", "int64")]
    model = onnx.load(str(path))
    model = convert_float_to_float16(model, keep_io_types=keep or False, op_block_list=FP32_OPS,
                                     node_block_list=[n.name for n in model.graph.node] if fp32_inside
                                     else fp32_nodes(model.graph), disable_shape_infer=True)
    _drop_repeated_casts(model)
    _skip_round_trip_casts(model)
    save_model(gs.export_onnx(gs.import_onnx(model).toposort()), path)  # the converter's casts break the order


def _drop_repeated_casts(model: onnx.ModelProto) -> None:
    """onnxruntime < 1.32's converter adds one Cast per fp32 consumer of an fp16 value, all writing the same
    tensor name (not SSA: the checker refuses it); keep the first of each."""
    written: set[str] = set()
    kept = []
    for node in model.graph.node:
        if node.op_type == "Cast" and set(node.output) <= written:
            continue
        written.update(node.output)
        kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)


def _elem_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Element type of every tensor whose type the graph records."""
    typed = list(graph.input) + list(graph.output) + list(graph.value_info)
    types = {v.name: v.type.tensor_type.elem_type for v in typed}
    types.update({t.name: t.data_type for t in graph.initializer})
    return types


def _cast_to(node: onnx.NodeProto) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None) if node.op_type == "Cast" else None


def _skip_round_trip_casts(model: onnx.ModelProto) -> None:
    """Between two fp32 islands the converter leaves Cast(fp32→fp16) → Cast(fp16→fp32): a round trip that
    rounds the island's values and overflows past 65504 (a GroupNorm's squared deviations, the timestep
    times frequency). Consumers of such a pair read the fp32 tensor itself; casts left unread are removed."""
    graph, types = model.graph, _elem_types(model.graph)
    producers = {out: node for node in graph.node for out in node.output}
    direct = {}
    for node in graph.node:
        source = producers.get(node.input[0]) if _cast_to(node) == onnx.TensorProto.FLOAT else None
        if source is not None and _cast_to(source) == onnx.TensorProto.FLOAT16 \
                and types.get(source.input[0]) == onnx.TensorProto.FLOAT:
            direct[node.output[0]] = source.input[0]
    for node in graph.node:
        node.input[:] = [direct.get(name, name) for name in node.input]
    _drop_unread_casts(graph)


def _drop_unread_casts(graph: onnx.GraphProto) -> None:
    """Remove Cast nodes whose output nothing reads (repeatedly: a removed Cast may leave its source unread)."""
    while True:
        read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        kept = [n for n in graph.node if n.op_type != "Cast" or any(o in read for o in n.output)]
        if len(kept) == len(graph.node):
            return
        del graph.node[:]
        graph.node.extend(kept)


