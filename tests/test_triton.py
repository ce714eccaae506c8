"""`pnp-trt triton-repo` served by a real Triton Inference Server: the tritonserver bundled in nvidia-pytriton
0.7.0 (Triton 2.51, Python backend, CPU), started by `tools/pytriton-tritonserver.sh` from its own virtual
environment (numpy < 2, as pytriton needs), made once in `.triton-venv/` and reused. Clients: tritonclient over
HTTP and gRPC, run from that venv too (`tests/triton_client_job.py`: tritonclient's gRPC half pins a protobuf
that Ray's cannot share)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import random_image
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".triton-venv"
TRITON_PACKAGES = ["numpy<2", "nvidia-pytriton==0.7.0", "tritonclient[http,grpc]==2.73.0"]
SETTINGS = {"STEPS": 2, "HEIGHT": 64, "WIDTH": 128}
pytestmark = pytest.mark.timeout(900)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def triton_venv() -> Path:
    """The server's environment: pytriton (its tritonserver), numpy < 2 and this checkout of pnp-trt (editable,
    so it runs the code under test). Made once; a half-made one (no `.ready`) is made again."""
    ready = VENV / ".ready"
    if ready.exists() and ready.read_text() == " ".join(TRITON_PACKAGES) + "\n":
        return VENV
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    made = subprocess.run([*pip, *TRITON_PACKAGES, "-e", str(ROOT)], capture_output=True, text=True, timeout=600)
    if made.returncode != 0:
        if os.environ.get("CI") == "true":  # CI must run these tests, never skip them
            raise RuntimeError(f"could not make {VENV}: {made.stderr[-2000:]}")
        pytest.skip(f"Triton's environment could not be installed (pip needs the package index once): "
                    f"{made.stderr.strip().splitlines()[-1][:160] if made.stderr.strip() else made.returncode}")
    ready.write_text(" ".join(TRITON_PACKAGES) + "\n")
    return VENV


class Triton:
    """A tritonserver process on free loopback ports, its log in a file."""

    def __init__(self, repository: Path, log: Path):
        self.http, self.grpc, self.metrics = _free_port(), _free_port(), _free_port()
        self.log = log
        command = [str(ROOT / "tools" / "pytriton-tritonserver.sh"), str(repository), str(self.http),
                   str(self.grpc), str(self.metrics)]  # the launcher keeps the loadable models serving
        self.process = subprocess.Popen(command, env={**os.environ, "VENV": str(triton_venv())},
                                        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def ready(self, model: str) -> bool:
        """KServe v2 readiness of a model (the server's own is false while any model is not ready)."""
        import httpx

        try:
            return httpx.get(f"http://127.0.0.1:{self.http}/v2/models/{model}/ready", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def wait_live(self, seconds: float = 180) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            if self.ready("pnp_trt"):
                return
            time.sleep(0.5)
        raise AssertionError(f"tritonserver not ready within {seconds} s: {self.log.read_text()[-3000:]}")

    def metric(self, name: str) -> float:
        import httpx

        text = httpx.get(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))

    def stop(self) -> None:
        os.killpg(self.process.pid, 15)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)


@pytest.fixture(scope="module")
def triton(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    """A repository with the tiny export (`pnp_trt`) and one whose export is damaged after writing (`broken`)."""
    folder = tmp_path_factory.mktemp("triton")
    repository, damaged = folder / "models", folder / "damaged-export"
    repository.mkdir()
    shutil.copytree(exported, damaged)
    for name, export in (("pnp_trt", exported), ("broken", damaged)):
        result = subprocess.run([sys.executable, "-m", "pnp_trt.cli", "triton-repo", str(repository), "--engines",
                                 str(export), "--name", name], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    (damaged / "unet.onnx").write_bytes(b"not a graph")
    server = Triton(repository, folder / "tritonserver.log")
    try:
        server.wait_live()
        yield server
    finally:
        server.stop()


def ask(server: Triton, protocol: str, requests: list[dict], concurrent: bool = False) -> list[dict]:
    """Send `requests` ({"guidance": {"image": bytes} | {"source_prompt": str}, "prompts": [...], "settings":
    {...}, "types": {...}}) with tritonclient from the Triton venv (`tests/triton_client_job.py`); one answer
    each."""
    job = {"protocol": protocol, "concurrent": concurrent,
           "address": f"127.0.0.1:{server.http if protocol == 'http' else server.grpc}",
           "requests": [{"image": base64.b64encode(r["guidance"]["image"]).decode() if "image" in r["guidance"]
                         else None, "source_prompt": r["guidance"].get("source_prompt"), "prompts": r["prompts"],
                         "settings": r.get("settings", {}), "types": r.get("types", {})} for r in requests]}
    done = subprocess.run([str(VENV / "bin" / "python"), str(ROOT / "tests" / "triton_client_job.py")],
                          input=json.dumps(job), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _images(answer: dict) -> list[np.ndarray]:
    assert "images" in answer, answer
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))) for png in answer["images"]]


@pytest.fixture(scope="module")
def guide(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return random_image(tmp_path_factory.mktemp("guide") / "g.png", 128, 64).read_bytes()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("source", ["image", "prompt"])
def test_a_translation_through_triton_equals_the_translator(triton: Triton, exported: Path, guide: bytes,
                                                            protocol: str, source: str) -> None:
    """Several prompts, from an image and from a source prompt: the same PNGs as `Translator.translate` with the
    same settings (ONNX Runtime CPU in both processes), and the record a CLI run writes."""
    from pnp_trt import Translator

    guidance = {"image": guide} if source == "image" else {"source_prompt": "a house"}
    prompts = ["a photo of a cat", "a castle"]
    answer, = ask(triton, protocol, [{"guidance": guidance, "prompts": prompts,
                                      "settings": {**SETTINGS, "GUIDANCE_SCALE": 5.0}}])
    direct = Translator.open("onnxruntime", engines=exported).translate(
        prompts, guidance.get("image"), guidance.get("source_prompt"), steps=2, height=64, width=128,
        guidance_scale=5.0)
    for served, image in zip(_images(answer), direct.images, strict=True):
        np.testing.assert_array_equal(served, np.asarray(image))
    record = answer["record"]
    assert record["prompts"] == prompts and record["settings"]["guidance_scale"] == 5.0
    if record["source_cache_hit"]:  # the other protocol's request on this guidance captured the source
        assert record["unet_evaluations"] < direct.unet_evaluations
    else:
        assert record["unet_evaluations"] == direct.unet_evaluations


def test_concurrent_requests_on_one_image_share_translations(triton: Triton, guide: bytes) -> None:
    """Triton's dynamic batcher hands several requests to one `execute`; those on the same guidance and settings
    run as one translation, each request getting its own prompt's image back."""
    before = triton.metric("pnp_trt_translations_total")
    prompts = [f"prompt {i}" for i in range(6)]
    settings = {**SETTINGS, "GUIDANCE_SCALE": 5.0}
    answers = ask(triton, "grpc", [{"guidance": {"image": guide}, "prompts": [p], "settings": settings}
                                   for p in prompts], concurrent=True)
    records = [a["record"] for a in answers]
    assert [r["prompts"] for r in records] == [[p] for p in prompts]
    translations = triton.metric("pnp_trt_translations_total") - before
    assert 1 <= translations < len(prompts), translations
    assert triton.metric("nv_inference_exec_count") >= 1 and triton.metric("pnp_trt_unet_evaluations_total") > 0


def _bad_cases(guide: bytes) -> list[tuple[str, dict, list[str], dict, str]]:
    """(name, guidance, prompts, settings, text in the error)."""
    image = {"image": guide}
    return [
        ("no guidance", {}, ["a"], SETTINGS, "exactly one guidance"),
        ("both guidances", {**image, "source_prompt": "b"}, ["a"], SETTINGS, "exactly one guidance"),
        ("no prompt", image, [], SETTINGS, "at least one non-empty prompt"),
        ("empty prompt", image, [""], SETTINGS, "prompt 1 must not be empty"),
        ("too many prompts", image, ["a"] * 9, SETTINGS, "9 prompts is over this server's limit of 8"),
        ("text as image", {"image": b"hello"}, ["a"], SETTINGS, "not an image"),
        ("truncated image", {"image": guide[:300]}, ["a"], SETTINGS, "damaged PNG (its IDAT chunk is cut short)"),
        ("tiny image", {"image": _png(Image.new("RGB", (8, 8)))}, ["a"], SETTINGS, "at least 64 px"),
        ("steps 0", image, ["a"], {**SETTINGS, "STEPS": 0}, "at least 1"),
        ("steps over the limit", image, ["a"], {**SETTINGS, "STEPS": 5000}, "limit of 100"),
        ("guidance NaN", image, ["a"], {**SETTINGS, "GUIDANCE_SCALE": float("nan")}, "finite"),
        ("feature injection 2", image, ["a"], {**SETTINGS, "FEATURE_INJECTION": 2.0}, "between 0 and 1"),
        ("height not a multiple of 64", image, ["a"], {**SETTINGS, "HEIGHT": 100}, "multiple of 64"),
        ("output too large", image, ["a"], {**SETTINGS, "HEIGHT": 4096, "WIDTH": 4096}, "Mpx limit"),
        ("seed negative", image, ["a"], {**SETTINGS, "SEED": -1}, "between 0 and 4294967295"),
        ("seed with an image", image, ["a"], {**SETTINGS, "SEED": 7}, "seed applies with a source prompt"),
        ("inversion steps missing timesteps", image, ["a"], {**SETTINGS, "INVERSION_STEPS": 3}, "never visits"),
        ("1 MB prompt", image, ["x" * 2**20], SETTINGS, "characters"),
    ]


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_one_line_errors_and_the_server_stays_ready(triton: Triton, guide: bytes,
                                                                    protocol: str) -> None:
    cases = _bad_cases(guide)
    assert len(cases) >= 15
    requests = [{"guidance": guidance, "prompts": prompts, "settings": settings}
                for _, guidance, prompts, settings, _ in cases]
    requests.append({"guidance": {"image": guide}, "prompts": ["a"], "settings": {**SETTINGS, "STEPS": 2.5},
                     "types": {"STEPS": "FP32"}})  # Triton's own check of the declared type
    requests.append({"guidance": {"image": guide}, "prompts": ["a"], "settings": SETTINGS})  # still serving
    answers = ask(triton, protocol, requests)
    for (name, _, _, _, fragment), answer in zip(cases, answers, strict=False):
        message = answer.get("error", "")
        assert fragment.lower() in message.lower() and "\n" not in message and "Traceback" not in message, \
            (name, answer)
    assert "error" in answers[-2] and len(_images(answers[-1])) == 1
    assert triton.ready("pnp_trt")


def test_a_model_over_a_broken_export_is_not_ready_and_the_log_says_why(triton: Triton) -> None:
    assert triton.ready("pnp_trt") and not triton.ready("broken")
    reason = [line for line in triton.log.read_text().splitlines() if "pnp-trt could not load the model" in line]
    assert reason and "unet.onnx" in reason[0] and "pnp-trt export" in reason[0], reason


def test_triton_repo_refuses_what_it_must_not_replace(exported: Path, tmp_path: Path) -> None:
    """The model directory is written whole or not at all, never over an existing one; a broken export, a bad
    name or a missing repository is one line and exit 2."""
    from typer.testing import CliRunner

    from pnp_trt.cli import app

    runner = CliRunner()
    (tmp_path / "repo" / "pnp_trt").mkdir(parents=True)
    mine = tmp_path / "repo" / "pnp_trt" / "mine.txt"
    mine.write_text("a user's file")
    for args, fragment in [
        ([str(tmp_path / "repo"), "--engines", str(exported)], "already exists; pnp-trt never replaces it"),
        ([str(tmp_path / "nowhere"), "--engines", str(exported)], "does not exist; create it first"),
        ([str(tmp_path / "repo"), "--engines", str(exported), "--name", "a/b"], "a Triton model name is"),
        ([str(tmp_path / "repo"), "--engines", str(tmp_path), "--name", "x"], "has no manifest.json"),
        ([str(tmp_path / "repo"), "--name", "x"], "pass --engines DIR"),
        ([str(tmp_path / "repo"), "--engines", str(exported), "--name", "x", "--kind", "tpu"], "--kind must be"),
    ]:
        result = runner.invoke(app, ["triton-repo", *args])
        assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output, \
            (args, result.output)
    assert mine.read_text() == "a user's file" and sorted(p.name for p in (tmp_path / "repo").iterdir()) == \
        ["pnp_trt"]
