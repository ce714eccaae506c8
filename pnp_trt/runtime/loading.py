"""Open a model on the backend a user names (imports each backend only when it is asked for)."""

from __future__ import annotations

import os
from pathlib import Path

from .. import validation
from ..config import check_backend
from ..errors import PnPError
from ..extras import require
from .backend import LoadedModel
from .onnxruntime_sessions import PROVIDERS


def check_source(backend: str, model: object, engines: object, provider: object) -> None:
    """What a backend runs from, checked by kind and for conflicts (`open_model`, `triton-repo`)."""
    check_backend(backend)
    for name, value in (("model", model), ("engines", engines), ("provider", provider)):
        if isinstance(value, os.PathLike) and name != "provider":
            value = os.fspath(value)
        if value is not None and not isinstance(value, (str, Path)):
            raise PnPError(f"{name} must be a path or a name (text), got {type(value).__name__}")
        if value is not None and not str(value):
            raise PnPError(f"--{name} is empty; give a value or leave the flag out")
        if value is not None:
            validation.path(f"--{name}", value)  # the NUL rule every path follows
    validation.one_of("--provider", provider, tuple(PROVIDERS))
    if backend != "onnxruntime" and provider not in (None, "cpu"):
        raise PnPError(f"--provider is for the onnxruntime backend; --backend {backend} picks its device itself "
                       "(CUDA where it is available)")
    if backend == "torch" and engines is not None:
        raise PnPError("--engines is for the onnxruntime and tensorrt backends; the torch backend runs --model "
                       "(a hub id or diffusers directory)")
    if backend != "torch" and model is not None:
        raise PnPError(f"--model is for the torch backend; --backend {backend} runs the exported directory "
                       "--engines, whose model is the one it was exported from")


def open_model(backend: str, model: str | Path | None, engines: Path | str | None, provider: str = "cpu",
               cuda_graphs: bool = True, injection_preset: str | None = None) -> LoadedModel:
    """torch runs a diffusers model (hub id or dir, as str or Path); the others run an exported/built
    directory. `cuda_graphs`: replay the UNet as CUDA graphs where the backend runs on CUDA. `injection_preset`:
    where PnP injects (`pnp-trt presets`; None: the family's default); an export carries the one it was made with."""
    check_source(backend, model, engines, provider)
    validation.boolean("cuda_graphs", cuda_graphs)
    if injection_preset is not None:
        validation.text("--injection-preset", injection_preset, non_blank=True)
    model = str(model) if isinstance(model, Path) else model
    if backend == "torch":
        require("torch", "the torch backend")
        from ..models import DEFAULT_MODEL
        from .torch_backend import open_torch
        return open_torch(DEFAULT_MODEL if model is None else model, cuda_graphs=cuda_graphs,
                          injection_preset=injection_preset)
    if engines is None:
        raise PnPError(f"--backend {backend} runs exported graphs: pass --engines DIR "
                       "(written by `pnp-trt export --model ID_OR_DIR --out DIR`)")
    engines = Path(engines)
    if injection_preset is not None:
        check_export_preset(engines, injection_preset)
    if backend == "onnxruntime":
        from .onnxruntime_backend import open_onnxruntime
        return open_onnxruntime(engines, provider, cuda_graphs)
    from ..engines.availability import require_tensorrt
    from ..manifest import read_manifest_for_tensorrt
    read_manifest_for_tensorrt(engines)
    require_tensorrt("--backend tensorrt")
    from .tensorrt_backend import open_tensorrt
    return open_tensorrt(engines, cuda_graphs)


def check_export_preset(engines: Path, injection_preset: str) -> None:
    """An exported directory's graphs carry the preset it was exported with: another one is refused, naming it."""
    from ..contract import ModelDims
    from ..families import preset
    from ..manifest import read_manifest, rebuild_hint

    manifest = read_manifest(engines)
    dims = ModelDims.from_dict(manifest["dims"])
    preset(dims.model_family, injection_preset)  # a name the family does not have: one line listing those it has
    exported = dims.preset
    if injection_preset != exported:
        raise PnPError(f"{engines} was exported with injection preset {exported!r}; for {injection_preset!r} export "
                       f"again: `{rebuild_hint(manifest, Path('NEW_DIR'), preset=injection_preset)}`")
