"""Fused attention exports: `--attention onnx` (the ONNX standard's `Attention`, opset 23) and `--attention
onnxruntime` (ONNX Runtime's MultiHeadAttention) write every UNet and VAE attention layer as one node (no score
matrix in memory) and translate as the standard export does; TensorRT refuses what it cannot parse, saying
the way out."""

from __future__ import annotations

import collections
import json
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
from pnp_trt.export.fused_attention import FUSED_OPS
from pnp_trt.images import load_guidance
from pnp_trt.models import load_diffusers
from pnp_trt.runtime.onnxruntime_backend import open_onnxruntime
from pnp_trt.runtime.translation import translate

runner = CliRunner()


def processors(model) -> list[str]:
    return [type(p).__name__ for part in (model.unet, model.vae) for p in part.attn_processors.values()]


@pytest.fixture(scope="module", params=sorted(FUSED_OPS))
def fused(request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported with each fused attention; the caller's attention processors are put back."""
    model = load_diffusers(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    before = processors(model)
    out = tmp_path_factory.mktemp("fused") / f"tiny-{request.param}"
    export_loaded(model, out, attention=request.param)
    assert processors(model) == before and "FusedAttentionProcessor" not in before
    return out


def attention_of(export: Path) -> str:
    return json.loads((export / "manifest.json").read_text())["attention"]


def op_counts(path: Path) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_every_attention_layer_is_one_fused_node(fused: Path, exported: Path, tiny_model_dir: Path) -> None:
    """As many fused nodes as attention layers, and no softmax left outside them (the text encoder's causal
    attention stays as it is: 77 tokens)."""
    model = load_diffusers(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    layers = {"unet": len(model.unet.attn_processors), "vae_encoder": 1, "vae_decoder": 1}
    op = FUSED_OPS[attention_of(fused)]
    for graph, count in layers.items():
        fused_ops, standard_ops = op_counts(fused / f"{graph}.onnx"), op_counts(exported / f"{graph}.onnx")
        assert fused_ops[op] == count and fused_ops["Softmax"] == 0
        assert standard_ops[op] == 0 and standard_ops["Softmax"] == count


def test_an_onnx_attention_export_is_standard_opset_23(fused: Path) -> None:
    """`Attention` in the standard domain at opset 23, no placeholder left, and the checker's full pass."""
    if attention_of(fused) != "onnx":
        pytest.skip("the standard op only")
    model = onnx.load(str(fused / "unet.onnx"), load_external_data=False)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 23)}
    assert all(n.domain == "" for n in model.graph.node)
    onnx.checker.check_model(str(fused / "unet.onnx"), full_check=True)


@pytest.mark.parametrize("source", ["image", "prompt"])
def test_fused_attention_translates_as_the_standard_export(fused: Path, exported: Path, tmp_path: Path,
                                                           source: str) -> None:
    config = TranslateConfig(steps=4, height=64, width=128)
    guidance = {"image": load_guidance(random_image(tmp_path / "g.png", 128, 64))} if source == "image" \
        else {"source_prompt": "a house"}
    prompts = ["a photo of a cat", "a castle"]
    ours = translate(open_onnxruntime(fused), prompts, config, **guidance)
    reference = translate(open_onnxruntime(exported), prompts, config, **guidance)
    assert rel_err(ours.latents, reference.latents) <= TOLERANCE["fp32"]  # measured 1.2e-5 (both kinds)


@pytest.mark.parametrize("attention", sorted(FUSED_OPS))
def test_fp16_fused_export_validates_and_runs(tiny_model_dir: Path, tmp_path: Path, attention: str) -> None:
    """The exporter's own check (every output within the fp16 tolerance of PyTorch) passes with fused fp16
    attention, and ONNX Runtime translates with it; `Attention` reads its fp16 inputs as they are (its softmax
    runs in fp32 by its own attribute: no Cast island around it)."""
    export_model(str(tiny_model_dir), tmp_path / "fp16", "fp16", attention=attention)
    result = translate(open_onnxruntime(tmp_path / "fp16"), ["a cat"], TranslateConfig(steps=2, height=64, width=64),
                       source_prompt="a house")
    assert np.isfinite(result.latents).all() and result.images[0].size == (64, 64)
    model = onnx.load(str(tmp_path / "fp16" / "unet.onnx"), load_external_data=False)
    producers = {out: node.op_type for node in model.graph.node for out in node.output}
    nodes = [n for n in model.graph.node if n.op_type == FUSED_OPS[attention]]
    assert nodes and all(producers.get(name) != "Cast" for n in nodes for name in n.input[:3])


@pytest.mark.parametrize("command", [["build", "{dir}"],
                                     ["translate", "--source-prompt", "a house", "-p", "a cat", "--backend",
                                      "tensorrt", "--engines", "{dir}", "--out", "{tmp}/o.png"]])
def test_tensorrt_refuses_a_fused_export_saying_how_to_export(fused: Path, tmp_path: Path,
                                                              command: list[str]) -> None:
    """Checked before TensorRT is looked for, so the answer is the same on a machine without it."""
    if attention_of(fused) != "onnxruntime":
        pytest.skip("TensorRT ≥ 10.14 parses the standard op (its version check: test_tensorrt_version_checks)")
    args = [a.format(dir=fused, tmp=tmp_path) for a in command]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "--attention onnxruntime, which only ONNX Runtime runs" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o.png").exists()


def test_unknown_attention_is_refused_before_loading(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["export", "--model", str(tiny_model_dir), "--out", str(tmp_path / "x"),
                                 "--attention", "flash"])
    assert result.exit_code == 2 and "--attention must be standard, onnx, onnxruntime, got 'flash'" in result.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("attention", "version", "refused"), [
    ("onnx", "10.13.3.9", "parses from 10.14 on; this is TensorRT 10.13.3.9"),
    ("onnx", "10.14.0.1", None), ("onnx", "11.1.0", None), ("standard", "10.1.0", None),
    ("onnxruntime", "11.1.0", "which only ONNX Runtime runs"),
])
def test_tensorrt_version_checks(attention: str, version: str, refused: str | None, tmp_path: Path) -> None:
    """What `pnp-trt build` and the TensorRT backend check once TensorRT is found: an `onnx` export needs
    10.14 (its parser's Attention importer), and every refusal names the export that suits (standard)."""
    from pnp_trt.engines.availability import tensorrt_release
    from pnp_trt.errors import PnPError
    from pnp_trt.manifest import require_tensorrt_attention

    manifest = {"attention": attention, "model_id": "m", "precision": "fp16"}
    if refused is None:
        require_tensorrt_attention(manifest, tmp_path, version)
    else:
        with pytest.raises(PnPError, match=refused) as caught:
            require_tensorrt_attention(manifest, tmp_path, version)
        assert "pnp-trt export --model m --precision fp16 --out NEW_DIR` (--attention standard)" in str(caught.value)
    assert tensorrt_release("10.13.2.6") == (10, 13) and tensorrt_release("11") == (11, 0) \
        and tensorrt_release("") == (0, 0)
