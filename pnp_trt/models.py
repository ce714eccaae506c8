"""Load the parts of a Stable Diffusion 1.x/2.x or SDXL pipeline that PnP uses, from a hub id or a local dir.

Weights load only from safetensors (`use_safetensors=True`): nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import validation
from .contract import ModelDims
from .errors import PnPError
from .families import FAMILIES, TIME_IDS, Family, detect, vae_fp32
from .injection import missing_layers
from .schedule import Schedule
from .tokenizer import PromptTokenizer

DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"


@dataclass
class TorchModel:
    """A loaded model: torch modules plus the torch-free pieces (tokenizer, scheduler config, dims)."""

    model_id: str
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: PromptTokenizer
    scheduler_config: dict[str, Any]
    dims: ModelDims
    device: torch.device
    dtype: torch.dtype
    text_encoder_2: Any = None
    """SDXL's second text encoder (CLIPTextModelWithProjection) and its tokenizer; None for SD 1.x/2.x."""
    tokenizer_2: PromptTokenizer | None = None

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def text_encoders(self) -> list[Any]:
        return [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]

    @property
    def tokenizers(self) -> dict[str, PromptTokenizer]:
        """Each text encoder graph input's tokenizer (`Family.text_inputs` order)."""
        found = [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]
        return dict(zip(self.dims.model_family.text_inputs, found, strict=True))


def quiet_loading() -> None:
    """Silence diffusers'/transformers' per-file progress bars and logs (the CLI shows its own progress and
    turns their failures into one line)."""
    import logging

    import diffusers
    import transformers

    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity(logging.CRITICAL)
        library.utils.logging.disable_progress_bar()


def default_device_dtype() -> tuple[torch.device, torch.dtype]:
    """fp16 on CUDA, fp32 on CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda"), torch.float16
    return torch.device("cpu"), torch.float32


def _check_layout(model: str) -> None:
    """A local directory must hold the diffusers parts PnP loads; say which are missing."""
    path = Path(model)
    if not path.exists():
        if model.startswith((".", "/", "~")) or path.suffix:
            raise PnPError(f"model directory {model} does not exist; pass a diffusers directory or a hub id")
        return
    family = _local_family(path)
    missing = [p for p in family.parts if not (path / p).is_dir()]
    if missing and (path / "manifest.json").is_file():
        raise PnPError(f"{model} is an exported directory (`pnp-trt export`), not a diffusers model; run it with "
                       f"--backend onnxruntime --engines {model}")
    if missing:
        raise PnPError(f"{model} is not a Stable Diffusion diffusers directory (missing {', '.join(missing)}); "
                       "pass a directory written by `save_pretrained` or `pnp-trt make-tiny-model`")
    _check_regular_files(path, family)
    _check_config_files(path, family)
    _check_weight_files(path, family)


def _local_family(path: Path) -> Family:
    """A local directory's family, from its UNet, pipeline and scheduler configs (unreadable ones: SD, left to the
    config checks to name); a refiner or few-step SDXL model is refused here, before anything loads."""
    import stat

    configs = []
    for file in ("unet/config.json", "model_index.json", "scheduler/scheduler_config.json"):
        try:  # only a small regular file: a FIFO would hang this read, /dev/zero never end (the checks name them)
            info = (path / file).stat()
            small = stat.S_ISREG(info.st_mode) and info.st_size < (1 << 20)
            config = json.loads((path / file).read_text()) if small else {}
        except (OSError, ValueError, RecursionError):
            config = {}
        configs.append(config if isinstance(config, dict) else {})
    return detect(*configs)


TEXT_FILE_LIMIT = {".json": 64 << 20, ".txt": 64 << 20}
"""The largest config, tokenizer or vocabulary file read (a CLIP tokenizer.json is ~3.6 MB; /dev/zero is endless)."""


def _check_regular_files(path: Path, family: Family) -> None:
    """Every file of the parts PnP loads (links followed) is a regular file, and its text files are of a sane
    size: a FIFO hangs a reader, a device such as /dev/zero never ends."""
    import stat

    for entry in [path / "model_index.json", *(f for part in family.parts for f in sorted((path / part).iterdir()))]:
        try:
            info = entry.stat()
        except FileNotFoundError:
            continue  # model_index.json is optional; a dangling link in a part is diffusers' to report
        except OSError as exc:
            raise PnPError(f"model {path}: cannot read {entry.relative_to(path)} ({exc.strerror})") from None
        if stat.S_ISDIR(info.st_mode):
            continue
        if not stat.S_ISREG(info.st_mode):
            raise PnPError(f"model {path}: {entry.relative_to(path)} is not a regular file (a FIFO, device or "
                           "socket); re-save the model")
        limit = TEXT_FILE_LIMIT.get(entry.suffix)
        if limit is not None and info.st_size > limit:
            raise PnPError(f"model {path}: {entry.relative_to(path)} is {info.st_size / 2**20:.0f} MiB, more than "
                           f"a model's {entry.suffix} file ever is ({limit >> 20} MiB); re-save the model")


def load_diffusers(model: str = DEFAULT_MODEL, device: torch.device | None = None,
                   dtype: torch.dtype | None = None, injection_preset: str | None = None) -> TorchModel:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and scheduler config of an SD 1.x/2.x or SDXL model (the
    family told from its configs); refuse UNets without the preset's layers."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    _check_layout(model)
    default_device, default_dtype = default_device_dtype()
    device, dtype = device or default_device, dtype or default_dtype
    weights: dict[str, Any] = {"use_safetensors": True, "torch_dtype": dtype}
    unet = _load_weights(model, "unet", UNet2DConditionModel, weights)
    scheduler_config = _load_part(model, "scheduler", lambda: dict(DDIMScheduler.load_config(model,
                                                                                            subfolder="scheduler")))
    family = detect(unet.config, _model_index(model), scheduler_config)
    vae = _load_weights(model, "vae", AutoencoderKL, weights)
    encoders = [_text_encoder(model, name, pooled=family.pooled and i == len(family.encoder_names) - 1, **weights)
                for i, name in enumerate(family.encoder_names)]
    tokenizers = [_tokenizer(model, name, encoder) for name, encoder in zip(family.tokenizer_names, encoders,
                                                                             strict=True)]
    if len({t.max_length for t in tokenizers}) > 1:
        raise PnPError(f"model {model}: its tokenizers pad to different lengths "
                       f"({', '.join(str(t.max_length) for t in tokenizers)}); SDXL's both pad to 77")
    pooled = int(encoders[-1].config.projection_dim) if family.pooled else 0
    dims = ModelDims.from_configs(unet.config, vae.config, tokenizers[0].max_length,
                                  sum(int(e.config.hidden_size) for e in encoders), family, injection_preset, pooled)
    _check_fit(model, unet, vae, dims)
    for module in [unet, vae, *encoders]:
        module.to(device).eval().requires_grad_(False)
    if dtype == torch.float16 and vae_fp32(family, vae.config):  # SDXL's VAE overflows in fp16 (`force_upcast`)
        vae.to(torch.float32)
    return TorchModel(model, unet, vae, encoders[0], tokenizers[0], scheduler_config, dims, device, dtype,
                      *encoders[1:], *tokenizers[1:])


def _model_index(model: str) -> dict[str, Any]:
    """A model's model_index.json (a hub id's through diffusers, as its parts are): it tells a refiner; {} where
    there is none to read."""
    try:
        if Path(model).exists():
            index = json.loads((Path(model) / "model_index.json").read_text())
        else:
            from diffusers import DiffusionPipeline
            index = DiffusionPipeline.load_config(model)
    except Exception:  # absent or unreadable: the family is then told by the UNet alone
        return {}
    return dict(index) if isinstance(index, dict) else {}


def _text_encoder(model: str, part: str, pooled: bool, **weights: Any) -> Any:
    """A CLIP text encoder; the one whose pooled, projected output conditions SDXL's UNet with its projection."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return _load_weights(model, part, CLIPTextModelWithProjection if pooled else CLIPTextModel, weights)


def _load_weights(model: str, part: str, kind: Any, weights: dict[str, Any]) -> Any:
    """A weighted part, whose weights must be exactly what its config builds (after the library's own renames):
    a tensor left over (a config edited to fewer layers: a different model would run silently) or one missing
    (left uninitialised) is refused."""
    module, info = _load_part(model, part, lambda: kind.from_pretrained(model, subfolder=part, output_loading_info=True,
                                                                          **weights))
    for key, what in (("unexpected_keys", "holds weights its config does not use"),
                      ("missing_keys", "lacks weights its config needs")):
        names = sorted(info.get(key) or ())
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            raise PnPError(f"model {model}: {part}/ {what} ({names[0]}{more}): {part}/config.json was edited, or the "
                           "weights belong to another model; re-save the model")
    return module


def _tokenizer(model: str, part: str, encoder: Any) -> PromptTokenizer:
    """A CLIP tokenizer padding to its encoder's length with its own pad token."""
    from transformers import CLIPTokenizer

    hf_tokenizer = _load_part(model, part, lambda: CLIPTokenizer.from_pretrained(model, subfolder=part))
    positions = int(encoder.config.max_position_embeddings)
    if hf_tokenizer.model_max_length != positions:
        raise PnPError(f"model {model}: {part}/tokenizer_config.json model_max_length is "
                       f"{validation.clipped(hf_tokenizer.model_max_length, 24)}; Stable Diffusion pads prompts to the "
                       f"text encoder's length: set it to {positions} (its max_position_embeddings)")
    vocabulary = int(encoder.config.vocab_size)
    for kind in ("pad", "bos", "eos", "unk"):  # a special token outside the encoder's vocabulary: IndexError later
        token, token_id = getattr(hf_tokenizer, f"{kind}_token"), getattr(hf_tokenizer, f"{kind}_token_id")
        if (kind == "pad" or token is not None) and (token_id is None or not 0 <= token_id < vocabulary):
            raise PnPError(f"model {model}: {part}'s {kind}_token {str(token)[:20]!r} is not in its vocabulary; fix "
                           "tokenizer_config.json or special_tokens_map.json")
    return PromptTokenizer(hf_tokenizer.backend_tokenizer, int(hf_tokenizer.model_max_length),
                           int(hf_tokenizer.pad_token_id), str(hf_tokenizer.pad_token))


def _check_fit(model: str, unet: Any, vae: Any, dims: ModelDims) -> None:
    """The UNet has the preset's layers and takes what the text encoders give (else diffusers fails mid-run)."""
    missing = missing_layers(unet, dims.points)
    if missing:
        raise PnPError(f"{model}'s UNet lacks the layers of injection preset {dims.preset!r} "
                       f"({', '.join(missing[:3])}); PnP supports {', '.join(f.about for f in FAMILIES.values())} "
                       "UNets: choose another --injection-preset, or another model")
    latent = int(vae.config.latent_channels)
    if unet.config.in_channels != latent or unet.config.out_channels != latent or unet.config.class_embed_type:
        raise PnPError(f"model {model}: its UNet takes {unet.config.in_channels} channels (its VAE gives {latent})"
                       f"{' and a class embedding' if unet.config.class_embed_type else ''}: an inpainting, depth, "
                       "upscaling or image-variation model, whose extra inputs PnP does not feed; use a text-to-image "
                       "model")
    width = unet.config.cross_attention_dim
    if width != dims.text_dim:
        raise PnPError(f"model {model}: the UNet's cross_attention_dim is {width}, its text encoders give "
                       f"{dims.text_dim}; parts of different models? re-save the model")
    if dims.pooled_dim:
        expected = dims.pooled_dim + TIME_IDS * int(unet.config.addition_time_embed_dim)
        if unet.config.projection_class_embeddings_input_dim != expected:
            raise PnPError(f"model {model}: the UNet's projection_class_embeddings_input_dim is "
                           f"{unet.config.projection_class_embeddings_input_dim}, the text encoder's pooled width and "
                           f"size conditioning make {expected}; parts of different models? re-save the model")


ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu", "swish")
"""The activations a CLIP text encoder config may name (SD 1.x's quick_gelu, SD 2.x and SDXL's gelu, …)."""
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
CONFIG_FIELDS: dict[str, dict[str, str]] = {
    "unet/config.json": {"in_channels": "count", "out_channels": "count", "sample_size": "count",
                         "layers_per_block": "count", "block_out_channels": "counts",
                         "attention_head_dim": "count or counts", "cross_attention_dim": "count or counts",
                         "center_input_sample": "flag", "upcast_attention": "flag", "flip_sin_to_cos": "flag",
                         "norm_eps": "epsilon", "norm_num_groups": "count", "mid_block_scale_factor": "scale",
                         "time_embedding_dim": "count?", "mid_block_only_cross_attention": "flag?",
                         "resnet_time_scale_shift": "one of default|scale_shift",
                         "cross_attention_norm": "one of group_norm|layer_norm?", "attention_type": "one of default",
                         "_class_name": "one of UNet2DConditionModel"},
    "vae/config.json": {"in_channels": "count", "latent_channels": "count", "block_out_channels": "counts",
                        "scaling_factor": "scale", "force_upcast": "flag", "layers_per_block": "count",
                        "norm_num_groups": "count", "shift_factor": "number?", "_class_name": "one of AutoencoderKL"},
    **{f"{encoder}/config.json": {"hidden_size": "count", "num_hidden_layers": "count",
                                  "num_attention_heads": "count", "intermediate_size": "count", "vocab_size": "count",
                                  "max_position_embeddings": "count", "projection_dim": "count",
                                  "layer_norm_eps": "epsilon", "model_type": "one of clip_text_model",
                                  "hidden_act": f"one of {'|'.join(ACTIVATIONS)}"}
       for encoder in ("text_encoder", "text_encoder_2")},
    SCHEDULER_CONFIG: {},  # read by `Schedule.from_config` (which types its fields); an object
}
"""The config values of a model directory checked before diffusers and transformers see them (they accept some
mistyped ones and fail later, deep inside, with messages that name neither the file nor the field)."""


MISMATCH_SIGNS = ("size mismatch", "expected shape", "look at the above report", "ignore_mismatched_sizes")
"""How diffusers and transformers say that a part's weights do not fit its config."""


def _load_part(model: str, part: str, load: Callable[[], Any]) -> Any:
    """One part loaded by diffusers or transformers, whose many error types (OSError, their own config and
    weight errors) become one line naming the part: each is the model's fault, not a bug."""
    try:
        return load()
    except PnPError:
        raise
    except Exception as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else lines[0] if lines else type(exc).__name__
        if any(sign in str(exc) for sign in MISMATCH_SIGNS):
            raise PnPError(f"cannot load model {model}: the weights in {part}/ do not fit {part}/config.json (a "
                           "tensor's shape differs: parts of different models?); re-save the model") from None
        hint = (f"; {part}/ holds a value its library refuses: check {part}/'s config files against the model's "
                "original, or re-save the model") if Path(model).exists() else (
            " (a hub id: is the model hub reachable? Otherwise pass a local diffusers directory)")
        if "safetensors" in str(exc):
            hint = (" (pnp-trt loads only safetensors weights, never pickled .bin/.ckpt files: convert them with "
                    "diffusers' save_pretrained(safe_serialization=True) in a trusted environment)")
        raise PnPError(f"cannot load model {model} ({part}): {text[:200]}{hint}") from None


def _check_weight_files(path: Path, family: Family) -> None:
    """Each weighted part holds safetensors files whose headers read (a truncated or empty one fails here, named,
    instead of diffusers looking for pickled weights and saying so)."""
    from safetensors import safe_open

    for part in ("unet", "vae", *family.encoder_names):
        files = sorted((path / part).glob("*.safetensors"))
        if not files:
            raise PnPError(f"model {path}: {part}/ has no .safetensors weights (pnp-trt loads only safetensors "
                           "weights, never pickled .bin/.ckpt files: convert them with diffusers' "
                           "save_pretrained(safe_serialization=True) in a trusted environment)")
        for file in files:
            if not file.is_file():
                raise PnPError(f"model {path}: {part}/{file.name} is not a regular file (a directory, FIFO or "
                               "device); put the weights file there")
            try:
                with safe_open(str(file), framework="numpy") as weights:
                    weights.keys()
            except Exception as exc:
                raise PnPError(f"model {path}: {part}/{file.name} is not a complete safetensors file "
                               f"({str(exc)[:80]}); re-save the model") from None


def _check_value(name: str, value: Any, kind: str) -> None:
    """One config value by its kind (`CONFIG_FIELDS`; a trailing ? also allows null)."""
    if kind.endswith("?"):
        if value is None:
            return
        kind = kind[:-1]
    if kind.startswith("one of "):
        validation.one_of(name, value, kind.removeprefix("one of ").split("|"))
    elif kind == "number":
        validation.number(name, value)
    elif kind == "scale":
        validation.number(name, value, 1e-6, 1e3)
    elif kind == "flag":
        validation.boolean(name, value)
    elif kind == "epsilon":
        validation.number(name, value, 1e-12, 1.0)
    elif isinstance(value, list) and "counts" in kind:
        if not value:
            raise PnPError(f"{name} must be a non-empty list")
        for i, item in enumerate(value):
            validation.integer(f"{name}[{i}]", item, 1, 1 << 20)
    elif kind == "counts":
        raise PnPError(f"{name} must be a list of whole numbers, got {validation.clipped(value)}")
    else:
        validation.integer(name, value, 1, 1 << 20)


def _check_tokenizer_files(tokenizer: Path) -> None:
    """A fast tokenizer's tokenizer.json, or a slow one's vocab.json and merges.txt: the JSON files readable."""
    fast, vocab = tokenizer / "tokenizer.json", tokenizer / "vocab.json"
    if not fast.is_file() and not (vocab.is_file() and (tokenizer / "merges.txt").is_file()):
        raise PnPError(f"{tokenizer.name}/ needs tokenizer.json, or vocab.json and merges.txt")
    for file in (fast, vocab):
        if file.is_file():
            try:
                readable = isinstance(json.loads(file.read_text()), dict)
            except (OSError, ValueError):
                readable = False
            if not readable:
                raise PnPError(f"{tokenizer.name}/{file.name} cannot be read as a JSON object")
    merges = tokenizer / "merges.txt"
    if not fast.is_file() and not any(line.strip() and not line.startswith("#")
                                      for line in merges.read_text(errors="replace").splitlines()):
        raise PnPError(f"{tokenizer.name}/merges.txt holds no merges (a CLIP tokenizer has ~49,000): damaged")
    if not (tokenizer / "tokenizer_config.json").is_file():
        raise PnPError(f"{tokenizer.name}/tokenizer_config.json is missing (it sets the prompt length, "
                       "model_max_length)")


def _check_config_files(path: Path, family: Family) -> None:
    """Every config file PnP loads is a JSON object whose sizes are typed and bounded; the tokenizers' files read."""
    try:
        for file, fields in CONFIG_FIELDS.items():
            if file.split("/")[0] not in family.parts:
                continue
            try:
                config = json.loads((path / file).read_text())
            except FileNotFoundError:
                raise PnPError(f"{file} is missing") from None
            except (OSError, ValueError, RecursionError) as exc:
                raise PnPError(f"{file} cannot be read as JSON ({str(exc)[:60] or 'nested too deeply'})") from None
            if not isinstance(config, dict):
                raise PnPError(f"{file} is not a JSON object")
            for key, kind in fields.items():
                if key in config:
                    _check_value(f"{file} {key}", config[key], kind)
            _check_against_defaults(file, config, set(fields))
            _check_together(file, config)
            if file == SCHEDULER_CONFIG:
                Schedule.from_config(config)  # its fields, typed as sampling reads them
        for tokenizer in family.tokenizer_names:
            _check_tokenizer_files(path / tokenizer)
    except PnPError as exc:
        raise PnPError(f"model {path} has a damaged config: {exc}; fix it or re-save the model") from None


def _check_together(file: str, config: dict[str, Any]) -> None:
    """Values that must fit each other: heads dividing the width, token ids inside the vocabulary, GroupNorm's
    groups dividing every block's channels."""
    if "hidden_size" in config and "num_attention_heads" in config \
            and config["hidden_size"] % config["num_attention_heads"]:
        raise PnPError(f"{file} hidden_size {config['hidden_size']} is not divisible by num_attention_heads "
                       f"{config['num_attention_heads']}")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is not None and "vocab_size" in config:
            validation.integer(f"{file} {key}", config[key], 0, config["vocab_size"] - 1)
    groups = config.get("norm_num_groups")
    if isinstance(groups, int) and any(isinstance(c, int) and c % groups for c in config.get("block_out_channels", [])):
        raise PnPError(f"{file} block_out_channels {config['block_out_channels']} are not all divisible by "
                       f"norm_num_groups {groups}")


def _config_defaults(file: str) -> dict[str, Any]:
    """The defaults of the class a config file configures (diffusers' UNet and VAE, transformers' CLIP text
    config): each field's default says its kind."""
    import inspect

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    owners: dict[str, Callable[..., Any]] = {"unet/config.json": UNet2DConditionModel.__init__,
                                             "vae/config.json": AutoencoderKL.__init__,
                                             "text_encoder/config.json": CLIPTextConfig.__init__,
                                             "text_encoder_2/config.json": CLIPTextConfig.__init__}
    owner = owners.get(file)
    if owner is None:
        return {}
    return {name: p.default for name, p in inspect.signature(owner).parameters.items()
            if p.default is not inspect.Parameter.empty}


def _check_against_defaults(file: str, config: dict[str, Any], checked: set[str]) -> None:
    """Every field whose default is a boolean must be one ("false" is true to Python), one whose default is a
    number a finite number (not a string, NaN or a boolean), and a whole one where the default is (a shift of
    0.5 steps); lists (per-block values) are the class's to check."""
    for key, default in _config_defaults(file).items():
        value = config.get(key)
        if key in checked or value is None or isinstance(value, list):
            continue
        if isinstance(default, bool):
            validation.boolean(f"{file} {key}", value)
        elif isinstance(default, (int, float)):
            validation.number(f"{file} {key}", value)
            if isinstance(default, int) and not float(value).is_integer():
                raise PnPError(f"{file} {key} must be a whole number, got {value}")
            if isinstance(default, int):  # sizes, counts, ids and shifts: 1e308 is none of them
                validation.number(f"{file} {key}", value, -(1 << 24), 1 << 24)


def model_identity(model_id: str) -> str:
    """What keys a torch model's cached sources: a hub id as given (a revision's files do not change); a
    local directory with a fingerprint of its weight files (name, size, modification time and the
    safetensors header with every tensor's dtype, shape and offsets), so re-saved weights never meet the
    old ones' cache entries. Reads a few KB per file, not the weights."""
    directory = Path(model_id)
    if not directory.is_dir():
        return model_id
    digest = hashlib.sha256()
    for path in sorted(directory.rglob("*.safetensors")):
        stat = path.stat()
        digest.update(f"{path.relative_to(directory)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        with open(path, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(header_size, 1 << 24)))
    return f"{model_id} (weights files {digest.hexdigest()[:16]})"


def weights_hash(model: TorchModel) -> str:
    """sha256 over every parameter's name, shape, dtype and bytes: identifies the weights, not the path."""
    digest = hashlib.sha256()
    for part in (model.unet, model.vae, *model.text_encoders):
        for name, tensor in part.state_dict().items():
            digest.update(json.dumps([name, list(tensor.shape), str(tensor.dtype)]).encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
