"""Export one contract graph to ONNX, clean it and check it (fp16 conversion: `mixed_precision.py`)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ..contract import GraphSpec
from ..errors import PnPError

TWO_GB = 2**31
TORCH_MAX_OPSET = 20
MEANING_CHANGED_AFTER_20 = {"GroupNormalization"}
"""Ops whose meaning changed in opsets 21-23 (GroupNormalization-21: per-channel scale and bias)."""
"""The newest opset the TorchScript exporter writes; newer standard ops are traced under a placeholder domain."""


def dynamic_axes(spec: GraphSpec) -> dict[str, dict[int, str]]:
    return {t.name: {i: a for i, a in enumerate(t.axes) if isinstance(a, str)} for t in spec.inputs + spec.outputs}


def export_graph(module: torch.nn.Module, spec: GraphSpec, example: Mapping[str, np.ndarray], path: Path,
                 opset: int) -> None:
    """Trace `module` (TorchScript exporter: it keeps batch/height/width dynamic on the UNet, DESIGN §3) at
    `opset`, or at the exporter's newest below it (`clean_graph` raises it)."""
    args = tuple(torch.from_numpy(np.asarray(example[name])) for name in spec.input_names)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=spec.input_names, output_names=spec.output_names,
                          dynamic_axes=dynamic_axes(spec), opset_version=min(opset, TORCH_MAX_OPSET),
                          dynamo=False)


def _weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers (ByteSize() itself fails past protobuf's 2 GB limit)."""
    return sum(int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
               for t in model.graph.initializer)


def save_model(model: onnx.ModelProto, path: Path) -> None:
    large = _weight_bytes(model) >= TWO_GB - (64 << 20)
    for stale in path.parent.glob(f"{path.name}.data"):
        stale.unlink()
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=f"{path.name}.data" if large else None)


def promote_newer_ops(model: onnx.ModelProto, opset: int) -> None:
    """Nodes traced under the placeholder domain become the standard ops they are, and the graph's standard
    opset becomes `opset` (opsets 21–23 add types and ops; the ops the exporter wrote at 20 mean the same)."""
    from .fused_attention import PLACEHOLDER_DOMAIN

    changed = sorted({n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx")} & MEANING_CHANGED_AFTER_20)
    if opset > TORCH_MAX_OPSET and changed:
        raise PnPError(f"cannot raise the opset to {opset}: {', '.join(changed)} means something else there")
    for node in model.graph.node:
        if node.domain == PLACEHOLDER_DOMAIN:
            node.domain = ""
    kept = [o for o in model.opset_import if o.domain != PLACEHOLDER_DOMAIN]
    for entry in kept:
        if entry.domain in ("", "ai.onnx"):
            entry.version = max(entry.version, opset)
    del model.opset_import[:]
    model.opset_import.extend(kept)


def clean_graph(raw: Path, path: Path, opset: int) -> None:
    """Fold constants, drop dead nodes, sort; save `raw` (the exporter's output, possibly one file per
    weight) as `path` (one external data file past 2 GB) at `opset` and infer shapes (path-based: works past
    2 GB)."""
    import onnx_graphsurgeon as gs
    import onnxruntime as ort

    ort.set_default_logger_severity(3)  # folding runs ORT; its optimizer notes are not the user's concern
    model = onnx.load(str(raw))
    promote_newer_ops(model, opset)
    graph = gs.import_onnx(model)
    if _weight_bytes(model) < TWO_GB:  # folding serializes the model for ORT: impossible past 2 GB; the
        graph.fold_constants()         # torch exporter has already folded what it could
    graph.cleanup().toposort()
    save_model(gs.export_onnx(graph), path)
    onnx.shape_inference.infer_shapes_path(str(path), str(path))


def stamp_export_id(path: Path, export_id: str, dims: dict[str, Any], settings: dict[str, Any]) -> None:
    """Write the export's id, the model dims and the stamped settings into the graph's own metadata (weights kept
    where they are: external data stays external, and is neither read nor rewritten)."""
    from ..manifest import EXPORT_DIMS_KEY, EXPORT_ID_KEY, EXPORT_SETTINGS_KEY

    model = onnx.load(str(path), load_external_data=False)
    onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props}, EXPORT_ID_KEY: export_id,
                                        EXPORT_DIMS_KEY: json.dumps(dims, sort_keys=True),
                                        EXPORT_SETTINGS_KEY: json.dumps(settings, sort_keys=True)})
    onnx.save_model(model, str(path))


def check_graph(path: Path) -> None:
    onnx.checker.check_model(str(path), full_check=False)


def run_onnxruntime(path: Path, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    from ..runtime.onnxruntime_sessions import session_options

    session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds)), strict=True))


def relative_errors(ours: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, float]:
    """max |a − b| / max |b| per output."""
    errors = {}
    for name, ref in reference.items():
        ref64 = np.asarray(ref, dtype=np.float64)
        scale = max(float(np.abs(ref64).max()), 1e-12)
        errors[name] = float(np.abs(np.asarray(ours[name], dtype=np.float64) - ref64).max() / scale)
    return errors
