"""Random-weight models with the real SD 2.1 topology: the tiny one (tiny widths, saved in diffusers format)
for the tests and the offline demo — it loads through exactly the code path a real model takes — and the
full-size SD 2.1-base shape (`random_sd21_model`) for benchmarks: speed depends on shapes, not weights.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .contract import INJECTION_POINTS
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


def vae(full: bool) -> Any:
    """The SD 2.1 VAE topology, at full or tiny widths."""
    from diffusers import AutoencoderKL
    widths, layers, groups = ((128, 256, 512, 512), 2, 32) if full else ((8, 16, 32, 32), 1, 8)
    return AutoencoderKL(block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=layers, norm_num_groups=groups,
                         latent_channels=4, sample_size=512, scaling_factor=0.18215)


def write_clip_tokenizer(directory: Path, words: Sequence[str] = _TOKEN_WORDS) -> Any:
    """A CLIP BPE tokenizer over single bytes plus `words` as whole tokens, as vocab.json + merges.txt."""
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
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), pad_token="!",
                              model_max_length=77)
    tokenizer.save_pretrained(str(directory))
    (directory / "tokenizer.json").unlink()  # ship vocab.json + merges.txt only, as SD checkpoints do
    return tokenizer


def text_encoder(vocab_size: int, bos: int, eos: int, width: int, layers: int, heads: int, intermediate: int) -> Any:
    """A CLIP text tower of SD 2.1's kind (the real one: 23 layers, 1024 wide, 16 heads, 4096 intermediate)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=intermediate,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            hidden_act="gelu", bos_token_id=bos, eos_token_id=eos, pad_token_id=0,
                            projection_dim=width)
    return CLIPTextModel(config)


def _sharpen_self_attention(unet: torch.nn.Module, factor: float) -> None:
    """Scale the injected layers' q/k weights so attention is peaked, as in trained models."""
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for point in INJECTION_POINTS:
            if point.kind != "feature":
                modules[point.module].weight.mul_(factor)


def make_tiny_model(out: Path, seed: int = 0, full_size: bool = False) -> Path:
    """Write the tiny model (or, `full_size`, random weights in the full SD 2.1-base shapes: ~5 GB) to `out`
    (must not exist yet) atomically; returns `out`."""
    from diffusers import UNet2DConditionModel

    out = Path(out)
    with staging_directory(out) as tmp:
        torch.manual_seed(seed)
        unet: Any = UNet2DConditionModel(**(sd21_unet_config() if full_size else tiny_unet_config()))
        if not full_size:
            _sharpen_self_attention(unet, 4.0)
        unet.save_pretrained(tmp / "unet", safe_serialization=True)
        vae(full=full_size).save_pretrained(tmp / "vae", safe_serialization=True)
        tokenizer = write_clip_tokenizer(tmp / "tokenizer")
        encoder = text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id,
                               *((1024, 23, 16, 4096) if full_size else (32, 2, 2, 64)))
        encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD21_SCHEDULER, indent=2))
        (tmp / "model_index.json").write_text(json.dumps(model_index(), indent=2))
        (tmp / MARKER).write_text(json.dumps({**recipe(seed, full_size), "files": _files(tmp)}))
    return out


MARKER = "pnp_trt_random_model.json"
"""Written into every model `make_tiny_model` makes: how it was made, so a rerun can reuse it."""


def recipe(seed: int, full_size: bool) -> dict[str, Any]:
    return {"seed": seed, "full_size": full_size, "format": 2}


def _files(directory: Path) -> dict[str, Any]:
    """sha256 and size of every file the model holds (the marker aside)."""
    from .manifest import file_entries

    return {name: entry for name, entry in file_entries(directory).items() if name != MARKER}


def made_with(directory: Path, seed: int, full_size: bool) -> bool:
    """Whether `directory` is a model this function made with these settings, every file as it wrote it (then
    it can be reused; one changed byte, and it is not)."""
    try:
        marker = json.loads((Path(directory) / MARKER).read_text())
        return isinstance(marker, dict) and marker.pop("files", None) == _files(Path(directory)) \
            and marker == recipe(seed, full_size)
    except (OSError, ValueError):
        return False


def model_index() -> dict[str, Any]:
    return {"_class_name": "StableDiffusionPipeline", "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
            "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}


def random_sd21_model(seed: int = 0, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Any:
    """An in-memory `TorchModel` with the full SD 2.1-base shapes and random weights (for benchmarks)."""
    from diffusers import UNet2DConditionModel

    from .contract import ModelDims
    from .models import TorchModel
    from .tokenizer import PromptTokenizer

    torch.manual_seed(seed)
    device = device or torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        hf_tokenizer = write_clip_tokenizer(Path(tmp) / "tokenizer")
    tokenizer = PromptTokenizer(hf_tokenizer.backend_tokenizer, 77, 0, "!")
    unet: Any = UNet2DConditionModel(**sd21_unet_config())
    autoencoder = vae(full=True)
    encoder = text_encoder(len(hf_tokenizer), hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id,
                           1024, 23, 16, 4096)
    for module in (unet, autoencoder, encoder):
        module.to(device, dtype).eval().requires_grad_(False)
    dims = ModelDims.from_configs(unet.config, autoencoder.config, 77, 1024)
    return TorchModel("random-sd21-base-shape", unet, autoencoder, encoder, tokenizer, dict(SD21_SCHEDULER), dims,
                      device, dtype)
