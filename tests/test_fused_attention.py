"""`--attention onnxruntime`: every attention layer exported as ONNX Runtime's fused MultiHeadAttention (no
score matrix in memory), translating as the standard export does; TensorRT refuses it with the way out."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import random_image, rel_err
from typer.testing import CliRunner

from pnp_trt.cli import app
from pnp_trt.config import TranslateConfig
from pnp_trt.contract import TOLERANCE
from pnp_trt.export.exporter import export_loaded, export_model
from pnp_trt.images import load_guidance
from pnp_trt.models import load_diffusers
from pnp_trt.runtime.onnxruntime_backend import open_onnxruntime
from pnp_trt.runtime.translation import translate

runner = CliRunner()


def processors(model) -> list[str]:
    return [type(p).__name__ for part in (model.unet, model.vae) for p in part.attn_processors.values()]


@pytest.fixture(scope="module")
def fused(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported with fused attention; the caller's attention processors are put back."""
    model = load_diffusers(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    before = processors(model)
    out = tmp_path_factory.mktemp("fused") / "tiny-fused"
    export_loaded(model, out, attention="onnxruntime")
    assert processors(model) == before and "FusedAttentionProcessor" not in before
    return out


def op_counts(path: Path) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_every_attention_layer_is_one_fused_node(fused: Path, exported: Path, tiny_model_dir: Path) -> None:
    """As many fused nodes as attention layers, and no softmax left outside them (the text encoder's causal
    attention stays as it is: 77 tokens)."""
    model = load_diffusers(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    layers = {"unet": len(model.unet.attn_processors), "vae_encoder": 1, "vae_decoder": 1}
    for graph, count in layers.items():
        fused_ops, standard_ops = op_counts(fused / f"{graph}.onnx"), op_counts(exported / f"{graph}.onnx")
        assert fused_ops["MultiHeadAttention"] == count and fused_ops["Softmax"] == 0
        assert standard_ops["MultiHeadAttention"] == 0 and standard_ops["Softmax"] == count


@pytest.mark.parametrize("source", ["image", "prompt"])
def test_fused_attention_translates_as_the_standard_export(fused: Path, exported: Path, tmp_path: Path,
                                                           source: str) -> None:
    config = TranslateConfig(steps=4, height=64, width=128)
    guidance = {"image": load_guidance(random_image(tmp_path / "g.png", 128, 64))} if source == "image" \
        else {"source_prompt": "a house"}
    prompts = ["a photo of a cat", "a castle"]
    ours = translate(open_onnxruntime(fused), prompts, config, **guidance)
    reference = translate(open_onnxruntime(exported), prompts, config, **guidance)
    assert rel_err(ours.latents, reference.latents) <= TOLERANCE["fp32"]  # measured 1.2e-5


def test_fp16_fused_export_validates_and_runs(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The exporter's own check (every output within the fp16 tolerance of PyTorch) passes with fused fp16
    attention, and ONNX Runtime translates with it."""
    export_model(str(tiny_model_dir), tmp_path / "fp16", "fp16", attention="onnxruntime")
    result = translate(open_onnxruntime(tmp_path / "fp16"), ["a cat"], TranslateConfig(steps=2, height=64, width=64),
                       source_prompt="a house")
    assert np.isfinite(result.latents).all() and result.images[0].size == (64, 64)


@pytest.mark.parametrize("command", [["build", "{dir}"],
                                     ["translate", "--source-prompt", "a house", "-p", "a cat", "--backend",
                                      "tensorrt", "--engines", "{dir}", "--out", "{tmp}/o.png"]])
def test_tensorrt_refuses_a_fused_export_saying_how_to_export(fused: Path, tmp_path: Path,
                                                              command: list[str]) -> None:
    """Checked before TensorRT is looked for, so the answer is the same on a machine without it."""
    args = [a.format(dir=fused, tmp=tmp_path) for a in command]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "--attention onnxruntime, which only ONNX Runtime runs" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o.png").exists()


def test_unknown_attention_is_refused_before_loading(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"),
                                 "--attention", "flash"])
    assert result.exit_code == 2 and "--attention must be standard or onnxruntime, got 'flash'" in result.output
    assert not (tmp_path / "x").exists()
