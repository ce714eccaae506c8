"""`pnp-trt export`: the four graphs + tokenizer + scheduler config + manifest, written atomically."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ..contract import PRECISIONS, TOLERANCE, axis_sizes, graph_specs
from ..errors import PnPError
from ..families import vae_fp32
from ..fileio import staging_directory
from ..manifest import ATTENTION, FORMAT_VERSION, GRAPHS, MANIFEST, contract_record, file_entries
from ..models import TorchModel, load_diffusers, weights_hash
from ..torch_graphs import PnPUNetGraph, TextEncoderGraph, VaeDecoderGraph, VaeEncoderGraph
from .fused_attention import attention_for_export
from .mixed_precision import to_mixed_fp16
from .onnx_graph import (
    check_graph,
    clean_graph,
    export_graph,
    relative_errors,
    run_onnxruntime,
    stamp_export_id,
)
from .stable_norm import two_pass_group_norms
from .trace_feeds import random_feeds

TRACE_SIZE, VALIDATE_SIZE = (2, 128, 128), (1, 64, 128)
"""(batch, height, width) traced, and checked afterwards at a different shape to prove the axes dynamic."""


@dataclass
class GraphReport:
    name: str
    errors: dict[str, float]

    @property
    def worst(self) -> float:
        """The largest error; NaN counts as infinite (NaN compares false with any tolerance)."""
        return max(e if math.isfinite(e) else math.inf for e in self.errors.values())


def torch_graphs(model: TorchModel) -> dict[str, torch.nn.Module]:
    return {"text_encoder": TextEncoderGraph(model.text_encoders, model.dims),
            "vae_encoder": VaeEncoderGraph(model.vae), "vae_decoder": VaeDecoderGraph(model.vae),
            "unet": PnPUNetGraph(model.unet, model.dims)}


def _torch_outputs(module: torch.nn.Module, spec: Any, feeds: dict[str, Any]) -> dict[str, Any]:
    with torch.no_grad():
        outputs = module(*(torch.from_numpy(feeds[n]) for n in spec.input_names))
    return {n: o.float().numpy() for n, o in zip(spec.output_names, outputs, strict=True)}


def export_one(name: str, module: torch.nn.Module, model: TorchModel, out: Path, precision: str,
               opset: int, export_id: str, attention: str = "standard") -> GraphReport:
    """Export, clean, check, and validate one graph against PyTorch at a shape other than the traced one; then
    stamp it with the export's id and settings."""
    spec = graph_specs(model.dims)[name]
    vocab = int(model.text_encoder.config.vocab_size)
    path, scratch = out / f"{name}.onnx", Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out))
    try:
        raw = scratch / path.name
        export_graph(module, spec, random_feeds(spec, axis_sizes(model.dims, *TRACE_SIZE), "float32", 0, vocab),
                     raw, opset)
        clean_graph(raw, path, opset)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if precision == "fp16":
        to_mixed_fp16(path, spec, name.startswith("vae") and vae_fp32(model.dims.model_family, model.vae.config))
    check_graph(path)
    feeds = random_feeds(spec, axis_sizes(model.dims, *VALIDATE_SIZE), "float32", 1, vocab)
    reference = _torch_outputs(module, spec, feeds)
    broken = [n for n, out in reference.items() if not np.isfinite(out).all()]
    if broken:
        raise PnPError(f"the model's {name} computes NaN or infinite values ({broken[0]}) from ordinary inputs: its "
                       "weights are damaged; nothing was written. Re-save or re-download the model")
    onnx_feeds = {t.name: feeds[t.name].astype(t.numpy_dtype(PRECISIONS[precision])) for t in spec.inputs}
    report = GraphReport(name, relative_errors(run_onnxruntime(path, onnx_feeds), reference))
    if report.worst > TOLERANCE[precision]:
        worst = max(report.errors, key=report.errors.__getitem__)
        raise PnPError(f"{name}.onnx disagrees with PyTorch: {worst} off by {report.worst:.2e} relative "
                       f"(tolerance {TOLERANCE[precision]:.0e}); the export is not trustworthy, nothing was written")
    stamp_export_id(path, export_id, model.dims.to_dict(),
                    {"precision": precision, "attention": attention, "opset": opset,
                     "vae_scaling_factor": model.scaling_factor})
    return report


def recorded_model_id(model_id: str) -> str:
    """A hub id as given; a local directory as its absolute path, so that a rebuild hint runs from anywhere."""
    return str(Path(model_id).resolve()) if Path(model_id).is_dir() else model_id


def write_side_files(model: TorchModel, out: Path, precision: str, opset: int, attention: str,
                     reports: list[GraphReport], versions: dict[str, str], export_id: str) -> None:
    """Tokenizer, scheduler config and the manifest (written last, over every other file)."""
    family = model.dims.model_family
    for tokenizer, name in zip(model.tokenizers.values(), family.tokenizer_names, strict=True):
        tokenizer.save(out / f"{name}.json")
    (out / "scheduler_config.json").write_text(json.dumps(model.scheduler_config, indent=2, default=str))
    manifest = {
        "format_version": FORMAT_VERSION, "model_id": recorded_model_id(model.model_id), "export_id": export_id,
        "weights_sha256": weights_hash(model),
        "dims": model.dims.to_dict(), "vae_scaling_factor": model.scaling_factor,
        "injection_points": [p.name for p in model.dims.points], "precision": precision, "opset": opset,
        "attention": attention,
        **{name: tokenizer.settings() for tokenizer, name in zip(model.tokenizers.values(), family.tokenizer_names,
                                                                 strict=True)},
        "graphs": contract_record(model.dims),
        "validation_relative_error": {r.name: r.errors for r in reports},
        "versions": versions, "files": file_entries(out),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))


def export_model(model_id: str, out: Path, precision: str = "fp32", opset: int | None = None,
                 attention: str = "standard",
                 on_graph: Callable[[str], None] = lambda name: None,
                 versions: dict[str, str] | None = None, injection_preset: str | None = None) -> list[GraphReport]:
    """Load a diffusers model (hub id or directory) on the CPU in fp32 and export it with the injection preset
    given (None: the family's default)."""
    opset = _check_destination(out, precision, opset, attention)
    model = load_diffusers(model_id, torch.device("cpu"), torch.float32, injection_preset)
    return export_loaded(model, out, precision, opset, attention, on_graph, versions)


OPSETS = range(17, 21)
"""17: LayerNormalization is one op (older opsets decompose it); 20: the newest the TorchScript exporter writes."""
ATTENTION_OPSET = 23
"""`--attention onnx`: the opset of the `Attention` op, the one such an export is written at."""


def _check_destination(out: Path, precision: str, opset: int | None, attention: str) -> int:
    """The opset to export at (None: 17, or 23 for `--attention onnx`), once the settings and `out` are fine."""
    if attention not in ATTENTION:
        raise PnPError(f"--attention must be {', '.join(ATTENTION)}, got {attention!r}")
    if precision not in TOLERANCE:
        raise PnPError(f"--precision must be fp32 or fp16, got {precision!r}")
    if attention == "onnx" and opset not in (None, ATTENTION_OPSET):
        raise PnPError(f"--attention onnx writes the opset-{ATTENTION_OPSET} Attention op: leave --opset out (or "
                       f"give {ATTENTION_OPSET}), got {opset}")
    if opset is None:
        opset = ATTENTION_OPSET if attention == "onnx" else OPSETS.start
    if attention != "onnx" and opset not in OPSETS:
        raise PnPError(f"--opset must be {OPSETS.start} to {OPSETS.stop - 1}, got {opset}")
    if os.path.lexists(out):
        what = "is a link to nowhere" if out.is_symlink() and not out.exists() else "already exists"
        raise PnPError(f"{out} {what}; choose a new --out directory (or remove it)")
    if not out.parent.is_dir():
        what = "is a file, not a directory" if out.parent.exists() else "does not exist"
        raise PnPError(f"cannot write {out}: {out.parent} {what}")
    return opset


def export_loaded(model: TorchModel, out: Path, precision: str = "fp32", opset: int | None = None,
                  attention: str = "standard", on_graph: Callable[[str], None] = lambda name: None,
                  versions: dict[str, str] | None = None) -> list[GraphReport]:
    """Export every graph of a loaded fp32 CPU model into a temporary directory beside `out`, then rename
    it into place: an interrupted or failed export leaves nothing behind. `attention`: see `ATTENTION`."""
    opset = _check_destination(out, precision, opset, attention)
    with two_pass_group_norms(model.unet, model.vae), attention_for_export(attention, model.unet, model.vae), \
            staging_directory(out) as tmp:
        graphs, reports, export_id = torch_graphs(model), [], uuid.uuid4().hex
        try:
            for name in GRAPHS:
                on_graph(name)
                reports.append(export_one(name, graphs[name], model, tmp, precision, opset, export_id, attention))
        finally:
            cast(PnPUNetGraph, graphs["unet"]).release_hooks()
        write_side_files(model, tmp, precision, opset, attention, reports, versions or {}, export_id)
    return reports
