"""Random-weight models with the real SD 2.1 or SDXL topology: the tiny ones (tiny widths, saved in diffusers
format) for the tests and the offline demo — they load through exactly the code path a real model takes — and the
full-size SD 2.1-base and SDXL-base shapes (`random_model`) for benchmarks: speed depends on shapes, not weights.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .contract import InjectionPoint, injection_points, up_transformer_layers
from .families import FAMILIES, SD, SDXL, Family
from .fileio import staging_directory

SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
    "steps_offset": 1, "timestep_spacing": "leading", "thresholding": False, "rescale_betas_zero_snr": False,
    "trained_betas": None,
}
_UNET_BLOCKS = {
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "layers_per_block": 2, "use_linear_projection": True, "in_channels": 4, "out_channels": 4,
}
_TOKEN_WORDS = ["a", "an", "the", "of", "photo", "painting", "watercolor", "castle", "cat", "dog", "in", "on"]


def sd21_unet_config() -> dict[str, Any]:
    """The SD 2.1-base UNet2DConditionModel config (865M parameters)."""
    return {**_UNET_BLOCKS, "block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": [5, 10, 20, 20],
            "cross_attention_dim": 1024, "norm_num_groups": 32, "sample_size": 64}


def tiny_unet_config() -> dict[str, Any]:
    return {**_UNET_BLOCKS, "block_out_channels": [32, 32, 64, 64], "attention_head_dim": [2, 4, 8, 8],
            "cross_attention_dim": 32, "norm_num_groups": 8, "sample_size": 64}


def vae(full: bool, sdxl: bool = False) -> Any:
    """The SD 2.1 VAE topology, at full or tiny widths (SDXL's: the same, scaled by 0.13025; both `force_upcast`,
    diffusers' default)."""
    from diffusers import AutoencoderKL
    widths, layers, groups = ((128, 256, 512, 512), 2, 32) if full else ((8, 16, 32, 32), 1, 8)
    return AutoencoderKL(block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=layers, norm_num_groups=groups,
                         latent_channels=4, sample_size=1024 if sdxl else 512,
                         scaling_factor=0.13025 if sdxl else 0.18215)


SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
"""stable-diffusion-xl-base-1.0's scheduler config (DESIGN §1b): DDIM is built from its betas and spacing."""


def sdxl_unet_config(full: bool) -> dict[str, Any]:
    """The SDXL-base UNet2DConditionModel config (2.6 B parameters), or the tiny one of DESIGN §1b: blocks
    (16, 32, 64), SDXL's block types, transformer depths [1, 2, 3], text of two encoders (32 + 48 wide)."""
    blocks = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
              "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2,
              "use_linear_projection": True, "in_channels": 4, "out_channels": 4, "addition_embed_type": "text_time"}
    if full:
        return {**blocks, "block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
                "transformer_layers_per_block": [1, 2, 10], "cross_attention_dim": 2048,
                "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 1280 + 6 * 256,
                "norm_num_groups": 32, "sample_size": 128}
    return {**blocks, "block_out_channels": [16, 32, 64], "attention_head_dim": [2, 4, 8],
            "transformer_layers_per_block": [1, 2, 3], "cross_attention_dim": 32 + 48, "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 48 + 6 * 8, "norm_num_groups": 8, "sample_size": 64}


def write_clip_tokenizer(directory: Path, words: Sequence[str] = _TOKEN_WORDS, pad_token: str = "!") -> Any:
    """A CLIP BPE tokenizer over single bytes plus `words` as whole tokens, as vocab.json + merges.txt, padding
    with `pad_token` (SD 2.x and SDXL's tokenizer_2: "!"; SD 1.x and SDXL's tokenizer: the end token)."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    directory.mkdir(parents=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token=pad_token,
                              model_max_length=77)
    tokenizer.save_pretrained(str(directory))
    (directory / "tokenizer.json").unlink()  # ship vocab.json + merges.txt only, as SD checkpoints do
    return tokenizer


def text_encoder(vocab_size: int, bos: int, eos: int, width: int, layers: int, heads: int, intermediate: int,
                 projected: bool = False) -> Any:
    """A CLIP text tower of SD 2.1's kind (the real one: 23 layers, 1024 wide, 16 heads, 4096 intermediate);
    `projected`: with its text projection, as SDXL's second encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=intermediate,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            hidden_act="gelu", bos_token_id=bos, eos_token_id=eos, pad_token_id=0,
                            projection_dim=width)
    return (CLIPTextModelWithProjection if projected else CLIPTextModel)(config)


def _sharpen_self_attention(unet: torch.nn.Module, points: tuple[InjectionPoint, ...], factor: float) -> None:
    """Scale the injected layers' q/k weights so attention is peaked, as in trained models."""
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for point in points:
            if point.kind != "feature":
                modules[point.module].weight.mul_(factor)


def make_tiny_model(out: Path, seed: int = 0, full_size: bool = False, family: str = SD.name) -> Path:
    """Write the tiny model of a family (or, `full_size`, random weights in the full SD 2.1-base or SDXL-base
    shapes: ~5 / ~14 GB) to `out` (must not exist yet) atomically; returns `out`."""
    from diffusers import UNet2DConditionModel

    kind, out = FAMILIES[family], Path(out)
    with staging_directory(out) as tmp:
        torch.manual_seed(seed)
        config = sdxl_unet_config(full_size) if kind is SDXL else sd21_unet_config() if full_size \
            else tiny_unet_config()
        unet: Any = UNet2DConditionModel(**config)
        if not full_size:
            points = injection_points(kind, kind.presets[kind.default_preset], up_transformer_layers(config))
            _sharpen_self_attention(unet, points, 4.0)
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        vae(full=full_size, sdxl=kind is SDXL).save_pretrained(tmp / "vae", safe_serialization=True)
        _write_text_encoders(tmp, kind, full_size)
        (tmp / "scheduler").mkdir()
        scheduler = SDXL_SCHEDULER if kind is SDXL else SD21_SCHEDULER
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(model_index(kind), indent=2))
        (tmp / MARKER).write_text(json.dumps({**recipe(seed, full_size, family), "files": _files(tmp)}))
    return out


TEXT_TOWERS = {  # (width, layers, heads, intermediate) per text encoder, tiny and full
    (SD.name, False): [(32, 2, 2, 64)], (SD.name, True): [(1024, 23, 16, 4096)],
    (SDXL.name, False): [(32, 2, 2, 64), (48, 2, 2, 96)],
    (SDXL.name, True): [(768, 12, 12, 3072), (1280, 32, 20, 5120)],
}
"""SDXL's two encoders differ in width (768 and 1280; tiny: 32 and 48), so a wrong concatenation order shows."""


def _write_text_encoders(directory: Path, kind: Family, full_size: bool) -> None:
    """Each text encoder with its tokenizer (SDXL's first pads with the end token, its second with "!")."""
    towers = TEXT_TOWERS[kind.name, full_size]
    for i, (encoder_name, tokenizer_name) in enumerate(zip(kind.encoder_names, kind.tokenizer_names, strict=True)):
        pad = "<|endoftext|>" if kind is SDXL and i == 0 else "!"
        tokenizer = write_clip_tokenizer(directory / tokenizer_name, pad_token=pad)
        encoder = text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, *towers[i],
                               projected=kind.pooled and i == len(towers) - 1)
        encoder.save_pretrained(directory / encoder_name, safe_serialization=True)


MARKER = "pnp_trt_random_model.json"
"""Written into every model `make_tiny_model` makes: how it was made, so a rerun can reuse it."""


def recipe(seed: int, full_size: bool, family: str = SD.name) -> dict[str, Any]:
    return {"seed": seed, "full_size": full_size, "format": 2, **({"family": family} if family != SD.name else {})}


def _files(directory: Path) -> dict[str, Any]:
    """sha256 and size of every file the model holds (the marker aside)."""
    from .manifest import file_entries

    return {name: entry for name, entry in file_entries(directory).items() if name != MARKER}


def made_with(directory: Path, seed: int, full_size: bool, family: str = SD.name) -> bool:
    """Whether `directory` is a model this function made with these settings, every file as it wrote it (then
    it can be reused; one changed byte, and it is not)."""
    try:
        marker = json.loads((Path(directory) / MARKER).read_text())
        return isinstance(marker, dict) and marker.pop("files", None) == _files(Path(directory)) \
            and marker == recipe(seed, full_size, family)
    except (OSError, ValueError):
        return False


def model_index(kind: Family = SD) -> dict[str, Any]:
    common = {"text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
              "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if kind is SDXL:
        return {"_class_name": "StableDiffusionXLPipeline", **common,
                "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"], "force_zeros_for_empty_prompt": True}
    return {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"], **common,
            "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}


def random_model(family: str = SD.name, seed: int = 0, device: torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> Any:
    """An in-memory `TorchModel` with the full SD 2.1-base or SDXL-base shapes and random weights (for benchmarks:
    speed depends on shapes, not weights)."""
    from diffusers import UNet2DConditionModel

    from .contract import ModelDims
    from .families import vae_fp32
    from .models import TorchModel
    from .tokenizer import PromptTokenizer

    kind = FAMILIES[family]
    torch.manual_seed(seed)
    device = device or torch.device("cpu")
    tokenizers, encoders = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (width, layers, heads, intermediate) in enumerate(TEXT_TOWERS[family, True]):
            pad = "<|endoftext|>" if kind is SDXL and i == 0 else "!"
            hf_tokenizer = write_clip_tokenizer(Path(tmp) / f"tokenizer{i}", pad_token=pad)
            tokenizers.append(PromptTokenizer(hf_tokenizer.backend_tokenizer, 77, int(hf_tokenizer.pad_token_id), pad))
            encoders.append(text_encoder(len(hf_tokenizer), hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, width,
                                         layers, heads, intermediate, projected=kind.pooled and i == 1))
    unet: Any = UNet2DConditionModel(**(sdxl_unet_config(True) if kind is SDXL else sd21_unet_config()))
    autoencoder = vae(full=True, sdxl=kind is SDXL)
    for module in (unet, autoencoder, *encoders):
        module.to(device, dtype).eval().requires_grad_(False)
    if dtype == torch.float16 and vae_fp32(kind, autoencoder.config):
        autoencoder.to(torch.float32)
    pooled = int(encoders[-1].config.projection_dim) if kind.pooled else 0
    dims = ModelDims.from_configs(unet.config, autoencoder.config, 77, sum(e.config.hidden_size for e in encoders),
                                  kind, None, pooled)
    scheduler = SDXL_SCHEDULER if kind is SDXL else SD21_SCHEDULER
    return TorchModel(f"random-{family}-base-shape", unet, autoencoder, encoders[0], tokenizers[0], dict(scheduler),
                      dims, device, dtype, *encoders[1:], *tokenizers[1:])
