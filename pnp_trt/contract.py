"""The one source of truth for where PnP touches the UNet (a family's preset, expanded over the model's transformer
blocks) and for every graph's inputs and outputs.

Export, the runtime's feeds/buffers and TensorRT profiles all read these specs; nobody re-types a
tensor name. Torch-free, so the lean ONNX Runtime path can import it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from . import validation
from .errors import PnPError
from .families import FAMILIES, SD, TIME_IDS, Family, Preset, family, preset

FLOAT = "float"
"""Placeholder dtype: the graph's precision (float32, or float16 in mixed-precision exports)."""
PRECISIONS = {"fp32": "float32", "fp16": "float16"}
"""Export precision (as `--precision` and manifests spell it) → the dtype FLOAT tensors have."""
SIZE_MULTIPLE = 64
"""Image sides of every Stable Diffusion 1.x/2.x model are multiples of this (VAE factor 8 × the UNet's 3
downsamplings; SDXL's 2 make `SDXL_SIZE_MULTIPLE`); `ModelDims.size_multiple` computes it for a loaded model."""
SDXL_SIZE_MULTIPLE = 32
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}
"""Largest accepted error of any graph output against a reference run (the PyTorch model at export, ONNX Runtime
for an engine), relative to that output's magnitude."""


def array_precision(array: Any) -> str:
    """float16 or float32: the floating dtype of a numpy array or torch tensor, as the contract spells it."""
    return "float16" if str(array.dtype).endswith("float16") else "float32"


@dataclass(frozen=True)
class InjectionPoint:
    """One tensor PnP captures from the source pass and injects into the target pass."""

    name: str
    module: str
    """Dotted path of the torch module whose output is the tensor (diffusers UNet2DConditionModel)."""
    kind: str
    """'feature' (ResBlock conv2 output, [B,C,h,w]), 'query' or 'key' (self-attention, [B,h·w,C])."""
    up_block: int

    @property
    def gate(self) -> str:
        """The gate input that switches this point's injection on: features or attention."""
        return "inject_features" if self.kind == "feature" else "inject_attention"


def injection_points(family: Family, chosen: Preset, up_layers: tuple[int, ...]) -> tuple[InjectionPoint, ...]:
    """A preset's points for a UNet with `up_layers` transformer blocks per attention of each up block: the
    feature, then q and k of `attn1` in every transformer block of each listed attention."""
    block, resnet = _indices(chosen.feature, "resnets")
    points = [InjectionPoint(f"feature_up{block}_res{resnet}", f"{chosen.feature}.conv2", "feature", block)]
    for attention in chosen.attentions:
        block, layer = _indices(attention, "attentions")
        count = up_layers[block] if block < len(up_layers) else 1
        for j in range(count):
            path, suffix = f"{attention}.transformer_blocks.{j}.attn1", f"_block{j}" if count > 1 else ""
            points.append(InjectionPoint(f"q_up{block}_attn{layer}{suffix}", f"{path}.to_q", "query", block))
            points.append(InjectionPoint(f"k_up{block}_attn{layer}{suffix}", f"{path}.to_k", "key", block))
    return tuple(points)


def _indices(module: str, kind: str) -> tuple[int, int]:
    """(up block, index) of `up_blocks.B.<kind>.I`."""
    parts = module.split(".")
    if len(parts) != 4 or parts[0] != "up_blocks" or parts[2] != kind or not (parts[1] + parts[3]).isdigit():
        raise PnPError(f"injection module {module!r} is not up_blocks.N.{kind}.M")
    return int(parts[1]), int(parts[3])


GATES = ("inject_features", "inject_attention")


@dataclass(frozen=True)
class ModelDims:
    """The model sizes the graph shapes depend on (read from the diffusers configs)."""

    text_length: int
    text_dim: int
    latent_channels: int
    vae_factor: int
    unet_channels: tuple[int, ...]
    """UNet `block_out_channels` (down order)."""
    native_size: int = 512
    """The side the model was trained at (UNet `sample_size` × VAE factor): a translation's default short side."""
    family: str = SD.name
    preset: str = SD.default_preset
    """The injection preset (`families.Family.presets`) the graphs carry."""
    up_layers: tuple[int, ...] = ()
    """Transformer blocks per attention of each up block (empty: one each, as SD 1.x/2.x)."""
    pooled_dim: int = 0
    """Width of the pooled text embedding the UNet takes as `text_embeds` (0: none)."""

    @property
    def model_family(self) -> Family:
        return family(self.family)

    @cached_property
    def points(self) -> tuple[InjectionPoint, ...]:
        """Where PnP touches this UNet: the preset's points, expanded over its transformer blocks."""
        return injection_points(self.model_family, preset(self.model_family, self.preset), self.up_layers)

    @classmethod
    def from_configs(cls, unet: Mapping[str, Any], vae: Mapping[str, Any], text_length: int, text_dim: int,
                     family_: Family = SD, preset_name: str | None = None, pooled_dim: int = 0) -> ModelDims:
        factor, sample = 2 ** (len(vae["block_out_channels"]) - 1), unet.get("sample_size")
        preset(family_, preset_name)  # an unknown name is one line before anything loads further
        return cls(text_length=text_length, text_dim=text_dim,
                   latent_channels=int(unet["in_channels"]), vae_factor=factor,
                   unet_channels=tuple(int(c) for c in unet["block_out_channels"]),
                   native_size=int(sample) * factor if isinstance(sample, int) and sample > 0 else 512,
                   family=family_.name, preset=preset_name or family_.default_preset,
                   up_layers=up_transformer_layers(unet), pooled_dim=pooled_dim)

    def to_dict(self) -> dict[str, Any]:
        return {"text_length": self.text_length, "text_dim": self.text_dim,
                "latent_channels": self.latent_channels, "vae_factor": self.vae_factor,
                "unet_channels": list(self.unet_channels), "native_size": self.native_size,
                "family": self.family, "preset": self.preset, "up_layers": list(self.up_layers),
                "pooled_dim": self.pooled_dim}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelDims:
        """From a manifest's `dims`, every field typed and bounded (a tampered manifest is one line)."""
        channels = data.get("unet_channels")
        if not isinstance(channels, (list, tuple)) or not 2 <= len(channels) <= 8:
            raise PnPError(f"dims.unet_channels must be a list of 2 to 8 widths, got {validation.clipped(channels)}")
        factor = validation.integer("dims.vae_factor", data.get("vae_factor"), 1, 64)
        if factor & (factor - 1):
            raise PnPError(f"dims.vae_factor must be a power of two, got {factor}")
        name = validation.one_of("dims.family", data.get("family", SD.name), list(FAMILIES))
        chosen = validation.one_of("dims.preset", data.get("preset", FAMILIES[name].default_preset),
                                   list(FAMILIES[name].presets))
        layers = data.get("up_layers", [])
        if not isinstance(layers, (list, tuple)) or len(layers) > 8:
            raise PnPError(f"dims.up_layers must be a list of up to 8 counts, got {validation.clipped(layers)}")
        return cls(text_length=validation.integer("dims.text_length", data.get("text_length"), 1, 1024),
                   text_dim=validation.integer("dims.text_dim", data.get("text_dim"), 1, 65536),
                   latent_channels=validation.integer("dims.latent_channels", data.get("latent_channels"), 1, 64),
                   vae_factor=factor,
                   unet_channels=tuple(validation.integer(f"dims.unet_channels[{i}]", c, 1, 65536)
                                       for i, c in enumerate(channels)),
                   native_size=validation.integer("dims.native_size", data.get("native_size", 512), 8, 16384),
                   family=name, preset=chosen,
                   up_layers=tuple(validation.integer(f"dims.up_layers[{i}]", n, 1, 64) for i, n in enumerate(layers)),
                   pooled_dim=validation.integer("dims.pooled_dim", data.get("pooled_dim", 0), 0, 65536))

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE factor times the UNet's 3 downsamplings."""
        return self.vae_factor * 2 ** (len(self.unet_channels) - 1)

    def point_channels(self, point: InjectionPoint) -> int:
        """Channels of a captured tensor: up block k works at the width of down block (n-1-k)."""
        return self.unet_channels[len(self.unet_channels) - 1 - point.up_block]


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype and axes (ints are fixed; strings are dynamic)."""

    name: str
    dtype: str
    axes: tuple[int | str, ...]

    def shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(a if isinstance(a, int) else sizes[a] for a in self.axes)

    def numpy_dtype(self, precision: str) -> str:
        return precision if self.dtype == FLOAT else self.dtype


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def check_feeds(self, feeds: Collection[str]) -> None:
        """Every backend's `run` checks its feeds' names here first: a name the graph lacks was dropped silently
        before (a misspelt injected tensor ran the UNet uninjected); the first input sets the call's sizes."""
        unknown = set(feeds) - set(self.input_names)
        if unknown:
            raise ValueError(f"{self.name} has no input(s) {', '.join(sorted(unknown))}")
        if self.inputs[0].name not in feeds:
            raise ValueError(f"{self.name} needs its {self.inputs[0].name} input")

    def read_outputs(self, wanted: Collection[str] | None) -> list[str]:
        """The outputs a call returns, in contract order: those `wanted` (None: all of them)."""
        if wanted is None:
            return self.output_names
        unknown = set(wanted) - set(self.output_names)
        if unknown:
            raise ValueError(f"{self.name} has no output(s) {', '.join(sorted(unknown))}")
        return [name for name in self.output_names if name in wanted]


def up_transformer_layers(unet: Mapping[str, Any]) -> tuple[int, ...]:
    """Transformer blocks per attention of each up block, from a UNet config (diffusers reverses the down
    blocks' `transformer_layers_per_block` unless `reverse_transformer_layers_per_block` is given)."""
    down = unet.get("transformer_layers_per_block", 1)
    count = len(unet.get("up_block_types", ()))
    reverse = unet.get("reverse_transformer_layers_per_block")
    if reverse is not None:
        per_block = [r if isinstance(r, list) else [r] for r in reverse]
        if any(len(set(counts)) != 1 for counts in per_block):
            raise PnPError("this UNet's up blocks mix transformer depths within a block "
                           "(reverse_transformer_layers_per_block); pnp-trt's injection presets need one per block")
        return tuple(int(counts[0]) for counts in per_block)
    if isinstance(down, list):
        return tuple(int(n) for n in reversed(down))
    return (int(down),) * count if int(down) != 1 else ()


def captured_name(point: InjectionPoint) -> str:
    return f"captured_{point.name}"


def injected_name(point: InjectionPoint) -> str:
    return f"injected_{point.name}"


def _point_spec(dims: ModelDims, point: InjectionPoint, name: str, batch: int | str) -> TensorSpec:
    c = dims.point_channels(point)
    if point.kind == "feature":
        return TensorSpec(name, FLOAT, (batch, c, f"up{point.up_block}_height", f"up{point.up_block}_width"))
    return TensorSpec(name, FLOAT, (batch, f"up{point.up_block}_tokens", c))


def conditioning_specs(dims: ModelDims) -> tuple[TensorSpec, ...]:
    """The UNet's conditioning inputs: the text embeddings, and for SDXL the pooled text embedding and the size
    conditioning (`time_ids`). They travel together, batch-aligned, through the sampler's loops."""
    family_ = dims.model_family
    specs = [TensorSpec("encoder_hidden_states", FLOAT, ("batch", dims.text_length, dims.text_dim))]
    if family_.pooled:
        specs.append(TensorSpec("text_embeds", FLOAT, ("batch", dims.pooled_dim)))
    if family_.size_conditioning:
        specs.append(TensorSpec("time_ids", "float32", ("batch", TIME_IDS)))  # fp32, as the timestep: its
        # sinusoidal embedding reaches 1536 × freq
    return tuple(specs)


TEXT_OUTPUTS = {"encoder_hidden_states": "text_embeddings", "text_embeds": "pooled_embeddings"}
"""Which text encoder graph output feeds which UNet conditioning input."""


def graph_specs(dims: ModelDims) -> dict[str, GraphSpec]:
    """The four graphs of DESIGN §2 for a model of these dims."""
    latent = TensorSpec("latent", FLOAT, ("batch", dims.latent_channels, "latent_height", "latent_width"))
    image = TensorSpec("image", FLOAT, ("batch", 3, "height", "width"))
    conditioning = conditioning_specs(dims)
    points = dims.points
    unet_inputs = (
        TensorSpec("sample", FLOAT, latent.axes),
        TensorSpec("timestep", "float32", ("batch",)),
        *conditioning,
        *(_point_spec(dims, p, injected_name(p), 1) for p in points),
        *(TensorSpec(g, "bool", ()) for g in GATES),
    )
    unet_outputs = (
        TensorSpec("noise_pred", FLOAT, latent.axes),
        *(_point_spec(dims, p, captured_name(p), "batch") for p in points),
    )
    text_outputs = tuple(TensorSpec(TEXT_OUTPUTS[c.name], c.dtype, c.axes) for c in conditioning
                         if c.name in TEXT_OUTPUTS)
    return {
        "text_encoder": GraphSpec("text_encoder", tuple(TensorSpec(name, "int64", ("batch", dims.text_length))
                                                        for name in dims.model_family.text_inputs), text_outputs),
        "vae_encoder": GraphSpec("vae_encoder", (image,), (latent,)),
        "vae_decoder": GraphSpec("vae_decoder", (latent,), (image,)),
        "unet": GraphSpec("unet", unet_inputs, unet_outputs),
    }


def axis_sizes(dims: ModelDims, batch: int, height: int, width: int) -> dict[str, int]:
    """Sizes of every named dynamic axis for a batch of images of height × width pixels."""
    lh, lw = height // dims.vae_factor, width // dims.vae_factor
    sizes = {"batch": batch, "height": height, "width": width, "latent_height": lh, "latent_width": lw}
    for block in sorted({p.up_block for p in dims.points}):
        scale = 2 ** (len(dims.unet_channels) - 1 - block)
        sizes[f"up{block}_height"], sizes[f"up{block}_width"] = lh // scale, lw // scale
        sizes[f"up{block}_tokens"] = (lh // scale) * (lw // scale)
    return sizes


def call_sizes(dims: ModelDims, graph: str, first_input: tuple[int, ...]) -> dict[str, int]:
    """Axis sizes of one call of `graph`, read off the shape of its first input (contract order)."""
    batch = first_input[0]
    if graph == "text_encoder":
        return axis_sizes(dims, batch, 0, 0)
    scale = 1 if graph == "vae_encoder" else dims.vae_factor
    return axis_sizes(dims, batch, first_input[-2] * scale, first_input[-1] * scale)


class ZeroBuffers:
    """Zero-filled arrays per (tensor, shape), made once by `allocate` and reused: the stand-ins for inputs a
    call leaves out (nothing injected, gates false), in whatever array type the backend uses."""

    def __init__(self, allocate: Callable[[TensorSpec, tuple[int, ...]], Any]):
        self.allocate = allocate
        self._made: dict[tuple[str, tuple[int, ...]], Any] = {}

    def get(self, tensor: TensorSpec, shape: tuple[int, ...]) -> Any:
        key = (tensor.name, shape)
        if key not in self._made:
            self._made[key] = self.allocate(tensor, shape)
        return self._made[key]
