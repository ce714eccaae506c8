"""fp16 exports keep their fp32 islands truly fp32 (DESIGN §2): no Cast(→fp16) feeding a Cast(→fp32), so
normalization statistics, softmax and the timestep embedding keep fp32 range and precision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from pnp_trt.contract import FLOAT, GraphSpec, TensorSpec
from pnp_trt.export.mixed_precision import to_mixed_fp16
from pnp_trt.export.onnx_graph import clean_graph, export_graph, run_onnxruntime
from pnp_trt.export.stable_norm import TwoPassGroupNorm

NORM_SPEC = GraphSpec("norm", (TensorSpec("x", FLOAT, ("batch", 64, "height", "width")),),
                      (TensorSpec("y", FLOAT, ("batch", 64, "height", "width")),))


class NormThenConv(torch.nn.Module):
    """One SD ResBlock's GroupNorm → SiLU → conv, the GroupNorm as exported (two-pass)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = TwoPassGroupNorm(torch.nn.GroupNorm(32, 64))
        self.conv = torch.nn.Conv2d(64, 64, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.conv(torch.nn.functional.silu(self.norm(x))),)


def lossy_cast_pairs(model: onnx.ModelProto) -> list[str]:
    """Cast(→fp32) nodes fed straight by a Cast(→fp16)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    pairs = []
    for node in model.graph.node:
        source = producers.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if node.op_type == "Cast" and source is not None and source.op_type == "Cast" and \
                _to(node) == onnx.TensorProto.FLOAT and _to(source) == onnx.TensorProto.FLOAT16:
            pairs.append(node.name)
    return pairs


def _to(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "to")


@pytest.fixture(scope="module")
def norm_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("norm")
    example = {"x": np.random.default_rng(0).standard_normal((1, 64, 8, 8), dtype=np.float32)}
    export_graph(NormThenConv().eval(), NORM_SPEC, example, folder / "raw.onnx", 17)
    clean_graph(folder / "raw.onnx", folder / "norm.onnx", 17)
    to_mixed_fp16(folder / "norm.onnx", NORM_SPEC)
    return folder / "norm.onnx"


@pytest.mark.parametrize("std", [1.0, 100.0, 1000.0])
def test_group_norm_keeps_fp32_range(norm_fp16: Path, std: float) -> None:
    """A feature map with |x − mean| up to ~4·std: the fp16 graph stays within 1e-2 of fp32 torch."""
    x = (np.random.default_rng(1).standard_normal((2, 64, 16, 16)) * std + 3 * std).astype(np.float32)
    with torch.no_grad():
        reference = NormThenConv().eval()(torch.from_numpy(x))[0].numpy()
    ours = run_onnxruntime(norm_fp16, {"x": x.astype(np.float16)})["y"].astype(np.float32)
    error = np.abs(ours - reference).max() / np.abs(reference).max()
    assert error <= 1e-2, f"std {std}: {error:.2e} relative"


def test_no_lossy_cast_pairs_in_a_norm(norm_fp16: Path) -> None:
    assert lossy_cast_pairs(onnx.load(str(norm_fp16))) == []


@pytest.mark.parametrize("graph", ["unet", "vae_encoder", "vae_decoder", "text_encoder"])
def test_exported_fp16_graphs_have_no_lossy_cast_pairs(exported_fp16: Path, graph: str) -> None:
    assert lossy_cast_pairs(onnx.load(str(exported_fp16 / f"{graph}.onnx"))) == []


def test_timestep_embedding_computes_in_fp32(exported_fp16: Path) -> None:
    """t·freq (up to ~1,000 rad, where fp16 steps are 0.5 apart) and its sin/cos stay fp32, as in diffusers."""
    model = onnx.load(str(exported_fp16 / "unet.onnx"))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.input)}
    proj = [n for n in model.graph.node if "/time_proj/" in n.name and n.op_type in ("Mul", "Sin", "Cos")]
    assert len(proj) == 3
    assert all(types.get(name) == onnx.TensorProto.FLOAT for node in proj for name in node.output)


@pytest.fixture(scope="module")
def loud_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with UNet `conv_in` ×1000: GroupNorm inputs reach |x − mean| ≈ 2,600, as real models'
    activations do (fp16 squares of those overflow)."""
    import shutil

    from diffusers import UNet2DConditionModel

    loud = Path(shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("loud") / "model"))
    unet = UNet2DConditionModel.from_pretrained(loud / "unet", use_safetensors=True)
    with torch.no_grad():
        unet.conv_in.weight.mul_(1000)
        unet.conv_in.bias.mul_(1000)
    unet.save_pretrained(loud / "unet", safe_serialization=True)
    return loud


def test_loud_model_exports_at_fp16_and_translates_close_to_fp32(loud_model_dir: Path, tmp_path: Path) -> None:
    from conftest import psnr, random_image

    from pnp_trt.config import TranslateConfig
    from pnp_trt.export.exporter import export_model
    from pnp_trt.images import load_guidance
    from pnp_trt.runtime.onnxruntime_backend import open_onnxruntime
    from pnp_trt.runtime.translation import translate

    config = TranslateConfig(steps=4, height=256, width=256)
    image = load_guidance(random_image(tmp_path / "g.png", 256, 256))
    results = {}
    for precision in ("fp32", "fp16"):
        export_model(str(loud_model_dir), tmp_path / precision, precision)
        results[precision] = translate(open_onnxruntime(tmp_path / precision), ["a castle"], config, image=image)
    score = psnr(np.asarray(results["fp16"].images[0]), np.asarray(results["fp32"].images[0]))
    print(f"loud model, ONNX Runtime fp16 vs fp32: {score:.1f} dB")
    assert score >= 30
