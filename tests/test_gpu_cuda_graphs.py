"""CUDA graphs (torch) and ONNX Runtime's CUDA provider with IO binding (± its CUDA graphs): the same
images as the eager references. Run wherever CUDA (and, for ONNX Runtime, onnxruntime-gpu) is present."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import psnr, random_image

from pnp_trt import TranslateConfig
from pnp_trt.images import load_guidance
from pnp_trt.models import load_diffusers
from pnp_trt.runtime.torch_backend import open_torch
from pnp_trt.runtime.translation import translate

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CONFIG = TranslateConfig(steps=8, height=128, width=192, prompt_batch_size=2)
PROMPTS = ["a photo of a cat", "a painting of a dog", "a castle"]
CUDA = torch.device("cuda")


def _has_ort_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


needs_ort_cuda = pytest.mark.skipif(not _has_ort_cuda(), reason="needs onnxruntime-gpu")


def _psnrs(a, b) -> list[float]:
    return [psnr(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images, strict=True)]


@pytest.fixture
def image(tmp_path: Path):
    return load_guidance(random_image(tmp_path / "g.png", 192, 128))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_torch_cuda_graphs_match_eager(tiny_model_dir: Path, image, dtype: torch.dtype) -> None:
    model = load_diffusers(str(tiny_model_dir), CUDA, dtype)
    graphed, eager = open_torch(model), open_torch(model, cuda_graphs=False)
    replayed = translate(graphed, PROMPTS, CONFIG, image=image)
    scores = _psnrs(replayed, translate(eager, PROMPTS, CONFIG, image=image))
    print(f"torch {dtype} CUDA graphs vs eager PSNR: {scores}")
    assert min(scores) >= 45
    # batch 1 gates off (inversion, capture); batches 4 and 2 with both gates, features only, none
    assert len(graphed.backend.unet_graphs) == 7
    assert replayed.stats.unet_calls == 8 + 1 + 2 * 8  # 5 captures ride along the inversion, 1 alone


@needs_ort_cuda
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_onnxruntime_cuda_fp32_matches_torch(exported: Path, tiny_torch, image, cuda_graphs: bool) -> None:
    from pnp_trt.runtime.onnxruntime_backend import open_onnxruntime

    model = open_onnxruntime(exported, "cuda", cuda_graphs=cuda_graphs)
    ours = translate(model, PROMPTS, CONFIG, image=image)
    scores = _psnrs(ours, translate(tiny_torch, PROMPTS, CONFIG, image=image))
    print(f"onnxruntime CUDA fp32 (CUDA graphs {cuda_graphs}) vs torch fp32 PSNR: {scores}")
    assert min(scores) >= 45
    assert isinstance(ours.latents, np.ndarray)
    captured = [g for g in model.backend._graphed.values() if g is not None]  # None: that shape was given up
    assert len(captured) == len(model.backend._graphed) == (3 if cuda_graphs else 0)  # one per UNet batch: 1, 4, 2
    if cuda_graphs:  # one graph-enabled session for all (or, where ORT refused it, pinned ones sharing weights)
        print("ONNX Runtime CUDA graphs:", "one session" if model.backend._graph_session else "pinned sessions")
        assert model.backend._graph_session or model.backend._weights


@needs_ort_cuda
def test_onnxruntime_cuda_fp16_near_torch_fp16(exported_fp16: Path, tiny_model_dir: Path, image) -> None:
    """fp16 against fp16: the same graphs a TensorRT engine would be built from, on a GPU."""
    from pnp_trt.runtime.onnxruntime_backend import open_onnxruntime

    reference = translate(open_torch(str(tiny_model_dir), CUDA, torch.float16, cuda_graphs=False), PROMPTS, CONFIG,
                          image=image)
    for cuda_graphs in (False, True):
        ours = translate(open_onnxruntime(exported_fp16, "cuda", cuda_graphs=cuda_graphs), PROMPTS, CONFIG,
                         image=image)
        scores = _psnrs(ours, reference)
        print(f"onnxruntime CUDA fp16 (CUDA graphs {cuda_graphs}) vs torch fp16 PSNR: {scores}")
        assert min(scores) >= 35


@needs_ort_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("attention", ["onnx", "onnxruntime"])
def test_fused_attention_on_onnxruntime_cuda_matches_torch(tiny_model_dir: Path, image, tmp_path: Path,
                                                           precision: str, attention: str) -> None:
    """`--attention onnx` and `onnxruntime` on the CUDA provider (its fused attention kernels), ± CUDA graphs,
    against torch at the same precision."""
    from pnp_trt.export.exporter import export_model
    from pnp_trt.runtime.onnxruntime_backend import open_onnxruntime

    export_model(str(tiny_model_dir), tmp_path / "fused", precision, attention=attention)
    dtype, bound = (torch.float32, 45) if precision == "fp32" else (torch.float16, 35)
    reference = translate(open_torch(str(tiny_model_dir), CUDA, dtype, cuda_graphs=False), PROMPTS, CONFIG,
                          image=image)
    import warnings

    for cuda_graphs in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a graph that fell back to eager would warn
            ours = translate(open_onnxruntime(tmp_path / "fused", "cuda", cuda_graphs=cuda_graphs), PROMPTS, CONFIG,
                             image=image)
        scores = _psnrs(ours, reference)
        print(f"onnxruntime CUDA {precision} {attention} attention (CUDA graphs {cuda_graphs}) vs torch PSNR: "
              f"{scores}")
        assert min(scores) >= bound


def test_a_failed_capture_runs_that_signature_eagerly_with_one_warning() -> None:
    """A function that fails only while being captured (as TensorRT's enqueue can): the first call warns with the
    function's own error and answers eagerly; later calls of that signature run eagerly without warning; other
    signatures still capture. Proves `CudaGraphs` falls back instead of raising through `capture_end`."""
    import warnings

    from pnp_trt.runtime.cuda_graphs import CudaGraphs

    def function(inputs):
        if torch.cuda.is_current_stream_capturing() and inputs["x"].shape[0] == 2:
            raise RuntimeError("enqueue refused during capture")
        return {"y": inputs["x"] * 2}

    graphs = CudaGraphs(function, CUDA)
    x = torch.ones(2, 3, device=CUDA)
    with pytest.warns(RuntimeWarning, match="enqueue refused during capture"):
        assert torch.equal(graphs({"x": x})["y"], x * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(graphs({"x": x})["y"], x * 2)
        assert torch.equal(graphs({"x": torch.ones(1, 3, device=CUDA)})["y"], torch.full((1, 3), 2.0, device=CUDA))
    assert len(graphs) == 1


def test_a_capture_cuda_invalidated_turns_graphs_off_for_good_with_one_warning() -> None:
    """A host sync inside the capture invalidates it and `capture_end` raises (torch's allocator is then left
    mid-capture): that signature and every later one run eagerly on the caller's stream, correct results."""
    import warnings

    from pnp_trt.runtime.cuda_graphs import CudaGraphs

    def function(inputs):
        if torch.cuda.is_current_stream_capturing():
            torch.cuda.current_stream().synchronize()  # not allowed while capturing
        return {"y": inputs["x"] + 1}

    graphs = CudaGraphs(function, CUDA)
    x = torch.zeros(2, 3, device=CUDA)
    with pytest.warns(RuntimeWarning, match="until the process restarts"):
        first = graphs({"x": x})["y"]
    torch.cuda.synchronize()
    assert torch.equal(first, x + 1) and graphs.broken and len(graphs) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other = graphs({"x": torch.zeros(5, 3, device=CUDA)})["y"]
    torch.cuda.synchronize()
    assert torch.equal(other, torch.ones(5, 3, device=CUDA))
