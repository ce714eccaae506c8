"""Model families as data (DESIGN §1, §1b): where PnP touches each family's UNet, what its text encoders give and
its UNet takes, and how a family is told from a model's configs. Export, profiles, buffers, the cache and the
sampler read these; nothing else asks which family a model is. Torch-free."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import validation
from .errors import PnPError


@dataclass(frozen=True)
class Preset:
    """A named set of injection points: the ResBlock whose `conv2` output is the feature, and the attention
    modules (`Transformer2DModel`s) in every transformer block of which `attn1`'s q and k are injected."""

    feature: str
    attentions: tuple[str, ...]
    about: str


def _attentions(stages: Mapping[int, tuple[int, ...]]) -> tuple[str, ...]:
    return tuple(f"up_blocks.{block}.attentions.{layer}" for block, layers in stages.items() for layer in layers)


@dataclass(frozen=True)
class Family:
    """What one model family is to PnP."""

    name: str
    about: str
    presets: Mapping[str, Preset]
    text_inputs: tuple[str, ...]
    """The text encoder graph's token-id inputs, one per tokenizer (`tokenizer`, `tokenizer_2`, …)."""
    text_layer: str
    """Which hidden state a text encoder gives: 'last' (after the final norm) or 'penultimate' (`hidden_states[-2]`)."""
    pooled: bool
    """The last text encoder's pooled, projected output also conditions the UNet (`text_embeds`)."""
    size_conditioning: bool
    """The UNet also takes `time_ids`: original size, crop corner, target size (SDXL's micro-conditioning)."""
    vae_fp32: bool
    """The VAE runs in fp32 in fp16 exports (it overflows in fp16) unless its config says `force_upcast: false`."""

    @property
    def default_preset(self) -> str:
        return next(iter(self.presets))

    @property
    def tokenizer_names(self) -> tuple[str, ...]:
        """The tokenizers' names, as diffusers' subfolders and an export's files and manifest keys spell them."""
        return _numbered("tokenizer", len(self.text_inputs))

    @property
    def encoder_names(self) -> tuple[str, ...]:
        """The text encoders' diffusers subfolders."""
        return _numbered("text_encoder", len(self.text_inputs))

    @property
    def parts(self) -> tuple[str, ...]:
        """The diffusers subfolders PnP loads."""
        return ("unet", "vae", *self.encoder_names, *self.tokenizer_names, "scheduler")


def _numbered(name: str, count: int) -> tuple[str, ...]:
    return tuple(name if i == 0 else f"{name}_{i + 1}" for i in range(count))


SD = Family(
    name="sd", about="Stable Diffusion 1.x/2.x",
    presets={
        "pnp": Preset("up_blocks.1.resnets.1", _attentions({1: (1, 2), 2: (0, 1, 2), 3: (0, 1, 2)}),
                      "the paper's: decoder layers 4-11 (up_blocks[1].attentions[1,2], [2] and [3] all)"),
        "pnp-first-attention": Preset("up_blocks.1.resnets.1", _attentions({1: (0, 1, 2), 2: (0, 1, 2),
                                                                            3: (0, 1, 2)}),
                                      "the paper's plus up_blocks[1].attentions[0]"),
    },
    text_inputs=("input_ids",), text_layer="last", pooled=False, size_conditioning=False, vae_fp32=False,
)
SDXL = Family(
    name="sdxl", about="Stable Diffusion XL",
    presets={
        "pnp": Preset("up_blocks.0.resnets.1", _attentions({0: (1, 2), 1: (0, 1, 2)}),
                      "the resolution-faithful translation of the paper's: up_blocks[0].attentions[1,2] and "
                      "up_blocks[1].attentions[0,1,2], every transformer block"),
        "pnp-first-attention": Preset("up_blocks.0.resnets.1", _attentions({0: (0, 1, 2), 1: (0, 1, 2)}),
                                      "the default plus up_blocks[0].attentions[0] (other ports treat it as content)"),
    },
    text_inputs=("input_ids", "input_ids_2"), text_layer="penultimate", pooled=True, size_conditioning=True,
    vae_fp32=True,
)
FAMILIES = {family.name: family for family in (SD, SDXL)}
TIME_IDS = 6
"""SDXL's `time_ids`: original (h, w), crop top-left (0, 0), target (h, w)."""


def vae_fp32(family_: Family, vae_config: Mapping[str, Any]) -> bool:
    """Whether this model's VAE computes in fp32 in fp16 exports and fp16 torch runs (its I/O stays the export's)."""
    return family_.vae_fp32 and bool(vae_config.get("force_upcast", True))


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise PnPError(f"model family {name!r} is not one pnp-trt knows ({', '.join(FAMILIES)})")
    return FAMILIES[name]


def preset(family_: Family, name: str | None) -> Preset:
    """The named injection preset of a family (None: its default), or one line listing the family's presets."""
    name = family_.default_preset if name is None else name
    if name not in family_.presets:
        raise PnPError(f"--injection-preset {name!r} is not one of {family_.about}'s: "
                       + "; ".join(f"{n} ({p.about})" for n, p in family_.presets.items()))
    return family_.presets[name]


def detect(unet: Mapping[str, Any], model_index: Mapping[str, Any], scheduler: Mapping[str, Any]) -> Family:
    """The family of a model from its configs: SDXL's UNet adds text and size embeddings (`text_time`); a
    refiner (no first text encoder, aesthetic-score conditioning) and few-step schedules are refused."""
    if unet.get("addition_embed_type") != "text_time":
        return SD
    aesthetic = validation.boolean("model_index.json requires_aesthetics_score",
                                   model_index.get("requires_aesthetics_score", False))
    no_first_encoder = "text_encoder_2" in model_index and model_index.get("text_encoder") in (None, [None, None])
    if aesthetic or no_first_encoder:
        raise PnPError("this is an SDXL refiner (a second-stage UNet without source features of its own); PnP "
                       "runs on the SDXL base model or a fine-tune of it")
    kind = str(scheduler.get("_class_name", ""))
    if scheduler.get("timestep_spacing") == "trailing" or any(name in kind for name in FEW_STEP):
        raise PnPError(f"this SDXL model ships a few-step schedule ({kind or 'trailing spacing'}, as SDXL-Turbo, LCM "
                       "and TCD models do): DDIM inversion with classifier-free guidance, which PnP needs, does not "
                       "apply to it")
    return SDXL


FEW_STEP = ("LCM", "TCD")
"""Scheduler classes of distilled few-step models (an ancestral sampler alone is fine: DDIM replaces it)."""
