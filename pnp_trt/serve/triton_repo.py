"""`pnp-trt triton-repo`: a Triton Inference Server model repository entry for pnp-trt — `<name>/config.pbtxt`
(I/O from `triton_io`, the model's settings as parameters, dynamic batching, one instance group) and
`<name>/1/model.py` (Triton's Python backend, re-exporting `triton_model.TritonPythonModel`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import PnPError
from ..fileio import staging_directory
from .limits import ServeOptions
from .triton_io import INPUTS, OUTPUTS, TensorIO

MODEL_PY = '''"""Written by `pnp-trt triton-repo`: Triton's Python backend runs pnp-trt's model (its settings are this
model's config.pbtxt parameters). The Python that runs it must have pnp-trt installed."""

from pnp_trt.serve.triton_model import TritonPythonModel  # noqa: F401
'''
PARAMETERS = ("backend", "model", "engines", "provider", "cuda_graphs", "cache_dir", "max_upload_mb",
              "max_input_mpx", "max_output_mpx", "max_prompts", "max_steps")
"""The `ServeOptions` a Triton model instance reads (queueing, deadlines and batching are Triton's own)."""
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def _tensor(io: TensorIO) -> str:
    dims = ", ".join(str(d) for d in io.dims)
    optional = " optional: true" if io.optional else ""
    return f"  {{ name: {json.dumps(io.name)} data_type: {io.data_type} dims: [ {dims} ]{optional} }}"


def config_pbtxt(name: str, options: ServeOptions, instances: int, gpu: bool, max_batch_size: int,
                 queue_delay_us: int) -> str:
    """The model's configuration in protobuf text format."""
    parameters = {key: getattr(options, key) for key in PARAMETERS if getattr(options, key) is not None}
    lines = [f"name: {json.dumps(name)}", 'backend: "python"', f"max_batch_size: {max_batch_size}",
             f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}",
             "input [", ",\n".join(_tensor(io) for io in INPUTS), "]",
             "output [", ",\n".join(_tensor(io) for io in OUTPUTS), "]",
             f"instance_group [ {{ count: {instances} kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]"]
    lines += [f"parameters: {{ key: {json.dumps(key)} value: {{ string_value: {json.dumps(str(value))} }} }}"
              for key, value in parameters.items()]
    return "\n".join(lines) + "\n"


def write_repository(out: Path, name: str, options: ServeOptions, instances: int = 1, gpu: bool = False,
                     max_batch_size: int = 8, queue_delay_us: int = 10_000) -> Path:
    """Write `out/name` (created whole, or not at all; `out` may hold other models, `out/name` must not exist)."""
    if not NAME.fullmatch(name):
        raise PnPError(f"--name {name!r}: a Triton model name is letters, digits, '_', '.' and '-'")
    if not out.is_dir():
        what = "is not a directory" if out.exists() else "does not exist"
        raise PnPError(f"model repository {out} {what}; create it first (mkdir -p {out})")
    target = out / name
    if target.exists() or target.is_symlink():
        raise PnPError(f"{target} already exists; pnp-trt never replaces it: choose another --name or remove it")
    with staging_directory(target) as tmp:
        (tmp / "1").mkdir()
        (tmp / "1" / "model.py").write_text(MODEL_PY)
        (tmp / "config.pbtxt").write_text(config_pbtxt(name, options, instances, gpu, max_batch_size,
                                                       queue_delay_us))
    return target
