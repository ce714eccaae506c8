"""`pnp-trt serve`: every endpoint and error status through FastAPI's TestClient, request coalescing, a real
uvicorn process, and the page in headless Chromium (Debian's, driven by Playwright). Tiny model, ONNX Runtime,
loopback only."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import in_threads, random_image
from fastapi.testclient import TestClient
from PIL import Image

from pnp_trt.runtime.translator import Translator
from pnp_trt.serve.app import create_app
from pnp_trt.serve.limits import ServeLimits

SETTINGS = {"steps": "2", "height": "64", "width": "128"}


@pytest.fixture(scope="module")
def guide_png(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return random_image(tmp_path_factory.mktemp("guide") / "g.png", 128, 64).read_bytes()


@pytest.fixture(scope="module")
def translator(exported: Path) -> Translator:
    return Translator.open("onnxruntime", engines=exported)


def ready(client: TestClient) -> TestClient:
    for _ in range(200):
        if client.get("/healthz").status_code == 200:
            return client
        time.sleep(0.05)
    raise AssertionError(client.get("/healthz").json())


@pytest.fixture()
def client(translator: Translator) -> Iterator[TestClient]:
    with TestClient(create_app(lambda: translator, ServeLimits(), coalesce_ms=1)) as test_client:
        yield ready(test_client)


def post(client: TestClient, png: bytes | None, prompts: list[str], **fields: str) -> httpx.Response:
    files = {"image": ("g.png", png, "image/png")} if png is not None else None
    return client.post("/v1/translate", files=files, data={"prompt": prompts, **SETTINGS, **fields})


def decoded(response: httpx.Response) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in response.json()["images"]]


def test_healthz_is_503_until_the_model_is_loaded(translator: Translator) -> None:
    loaded = threading.Event()

    def load() -> Translator:
        loaded.wait(10)
        return translator

    with TestClient(create_app(load)) as client:
        waiting = client.get("/healthz")
        assert waiting.status_code == 503 and waiting.json()["status"] == "loading"
        assert client.post("/v1/translate", data={"prompt": "a", "source_prompt": "b"}).status_code == 503
        loaded.set()
        assert ready(client).get("/healthz").json()["status"] == "ok"


def test_a_failed_load_is_reported_by_healthz(tmp_path: Path) -> None:
    with TestClient(create_app(lambda: Translator.open("onnxruntime", engines=tmp_path))) as client:
        for _ in range(100):
            answer = client.get("/healthz")
            if answer.json()["status"] != "loading":
                break
            time.sleep(0.05)
        assert answer.status_code == 503 and "no manifest.json" in answer.json()["error"]


def test_translate_returns_one_png_per_prompt_as_the_library_does(client: TestClient, translator: Translator,
                                                                  guide_png: bytes) -> None:
    response = post(client, guide_png, ["a cat", "a dog"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["size"] == [64, 128] and body["unet_evaluations"] > 0 and ":" in body["served_by"]
    direct = translator.translate(["a cat", "a dog"], Image.open(io.BytesIO(guide_png)), steps=2, height=64,
                                  width=128)
    for served, image in zip(decoded(response), direct.images, strict=True):
        np.testing.assert_array_equal(served, np.asarray(image))
    png = post(client, guide_png, ["a cat"], source_prompt="")
    assert png.status_code == 422  # an empty source_prompt is still a second guidance
    single = client.post("/v1/translate", files={"image": ("g.png", guide_png)}, headers={"accept": "image/png"},
                         data={"prompt": "a cat", **SETTINGS})
    assert single.headers["content-type"] == "image/png" and Image.open(io.BytesIO(single.content)).size == (128, 64)
    two = client.post("/v1/translate", files={"image": ("g.png", guide_png)}, headers={"accept": "image/png"},
                      data={"prompt": ["a cat", "a dog"], **SETTINGS})  # corpus round 5: was 200 with JSON
    assert two.status_code == 406 and "image/png holds one image" in two.json()["error"]
    generated = post(client, None, ["a dog"], source_prompt="a cat")
    assert generated.status_code == 200 and len(decoded(generated)) == 1


@pytest.mark.parametrize(("fields", "files", "status", "message"), [
    ({"prompt": "a", "steps": "x"}, True, 422, "steps must be int, got 'x'"),
    ({"prompt": "a", "stepz": "2"}, True, 422, "unknown field(s) stepz"),
    ({"prompt": "a", "seed": "3"}, True, 422, "seed applies with a source prompt"),  # as on the CLI
    ({"prompt": "\u200b"}, True, 422, "must not be empty or only spaces, control or invisible"),
    ({"prompt": "a", "guidance_scale": "nan"}, True, 422, "must be a finite number"),
    ({"prompt": "a", "feature_injection": "2"}, True, 422, "between 0 and 1"),
    ({"prompt": "a", "steps": "1000"}, True, 422, "over this server's limit of 100"),
    ({"steps": "2"}, True, 422, "at least one non-empty prompt"),
    ({"prompt": ["a"] * 9}, True, 422, "9 prompts is over this server's limit of 8"),
    ({"prompt": "a", "source_prompt": "b"}, True, 422, "exactly one guidance"),
    ({"prompt": "a"}, False, 422, "exactly one guidance"),
    ({"prompt": "a", "height": "2048", "width": "2048"}, True, 422, "over the 1.05 Mpx limit"),
    ({"prompt": "a", "image": "not a file"}, False, 415, "must be a file upload"),
])
def test_bad_requests_get_one_json_line(client: TestClient, guide_png: bytes, fields: dict, files: bool,
                                        status: int, message: str) -> None:
    response = client.post("/v1/translate", data=fields, files={"image": ("g.png", guide_png)} if files else None)
    assert response.status_code == status and message in response.json()["error"]
    assert "\n" not in response.json()["error"] and set(response.json()) == {"error"}


def test_uploads_that_are_not_images_or_too_large(translator: Translator, guide_png: bytes) -> None:
    limits = ServeLimits(max_upload_bytes=len(guide_png) + 10, max_input_pixels=100 * 100)
    with TestClient(create_app(lambda: translator, limits)) as client:
        ready(client)
        cases = [(b"plain text", 415, "not an image"), (guide_png[:200], 415, "damaged PNG"),
                 (guide_png + bytes(100), 413, "upload limit"),
                 (_png(Image.new("RGB", (200, 100))), 413, "200x100, over this server's 0.01 Mpx limit"),
                 (_png(Image.new("RGB", (32, 32))), 422, "at least 64 px")]
        for data, status, message in cases:
            response = client.post("/v1/translate", files={"image": ("x", data)}, data={"prompt": "a", **SETTINGS})
            assert response.status_code == status and message in response.json()["error"], response.text
        assert client.post("/v1/translate", json={"prompt": "a"}).status_code == 415
        assert post(client, guide_png, ["a cat"]).status_code == 200  # none of that disturbed the server


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_full_queue_is_429_with_retry_after(client: TestClient, guide_png: bytes) -> None:
    server = client.app.state.server  # type: ignore[attr-defined]
    server.in_flight = server.limits.queue_length  # as if that many requests were waiting
    try:
        response = post(client, guide_png, ["a cat"])
    finally:
        server.in_flight = 0
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    assert "busy" in response.json()["error"]


def test_past_the_deadline_is_504_and_the_server_goes_on(translator: Translator, guide_png: bytes) -> None:
    with TestClient(create_app(lambda: translator, ServeLimits(deadline_s=0.05))) as client:
        ready(client)
        response = post(client, guide_png, ["a cat"], steps="20", height="256", width="256")
        assert response.status_code == 504 and "deadline" in response.json()["error"]
    with TestClient(create_app(lambda: translator)) as client:
        assert post(ready(client), guide_png, ["a cat"]).status_code == 200


def test_metrics_count_requests_cache_and_unet_evaluations(client: TestClient, guide_png: bytes) -> None:
    first = post(client, guide_png, ["a cat"], inversion_prompt="a fresh source")
    post(client, guide_png, ["a dog"], inversion_prompt="a fresh source")
    post(client, guide_png, ["a"], steps="x")
    text = client.get("/metrics").text
    assert 'pnp_requests_total{status="200"} 2.0' in text and 'pnp_requests_total{status="422"} 1.0' in text
    assert 'pnp_source_cache_total{result="hit"} 1.0' in text and 'pnp_source_cache_total{result="miss"} 1.0' in text
    assert "pnp_request_seconds_count 3.0" in text  # every answer is timed, the 422 too
    evaluations = float(text.split("\npnp_unet_evaluations_total ")[1].split()[0])
    assert evaluations == first.json()["unet_evaluations"] + 2 * 2  # the second: injection only (cache hit)


def test_concurrent_requests_on_one_source_share_one_translation(translator: Translator, guide_png: bytes) -> None:
    """Four requests on the same image and settings within the window: one translation, one injection batch
    of their four prompts, each request gets exactly its own images (equal to one call with all four)."""
    prompts = ["a cat", "a dog", "a bird", "a fish"]
    with TestClient(create_app(lambda: translator, coalesce_ms=300)) as client:
        ready(client)
        answers = in_threads([lambda p=p: post(client, guide_png, [p], guidance_scale="5") for p in prompts])
        metrics = client.get("/metrics").text
    assert all(a.status_code == 200 for a in answers)
    assert "pnp_translations_total 1.0" in metrics
    together = translator.translate(prompts, Image.open(io.BytesIO(guide_png)), steps=2, height=64, width=128,
                                    guidance_scale=5.0)
    for answer, image in zip(answers, together.images, strict=True):
        (served,) = decoded(answer)
        np.testing.assert_array_equal(served, np.asarray(image))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def serving(engines: Path, *flags: str) -> Iterator[str]:
    """`pnp-trt serve --engines` as a real process on a loopback port, its URL; stopped with SIGTERM."""
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "pnp_trt.cli", "serve", "--engines", str(engines),
                                "--port", str(port), *flags], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, 60)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def served(exported: Path) -> Iterator[str]:
    with serving(exported) as url:
        yield url


def test_a_real_server_process(served: str, guide_png: bytes) -> None:
    response = httpx.post(f"{served}/v1/translate", files={"image": ("g.png", guide_png)},
                          data={"prompt": ["a cat", "a dog"], **SETTINGS}, timeout=60)
    assert response.status_code == 200 and len(response.json()["images"]) == 2
    assert httpx.get(f"{served}/docs").status_code == 200
    assert "pnp_requests_total" in httpx.get(f"{served}/metrics").text
    missing = httpx.get(f"{served}/nowhere")
    assert missing.status_code == 404 and set(missing.json()) == {"error"}


def _upload_until_answered(url: str, declared: int | None, total: int) -> tuple[bytes, int]:
    """POST a multipart body of `total` bytes in 1 MiB pieces (chunked unless a length is `declared`), stopping
    as soon as the server answers; returns the answer's first bytes and how many body bytes went out."""
    import select
    import socket

    host, port = url.removeprefix("http://").split(":")
    head = (f"POST /v1/translate HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            + (f"Content-Length: {declared}\r\n" if declared else "Transfer-Encoding: chunked\r\n") + "\r\n")
    piece, sent = b"x" * (1 << 20), 0
    with socket.create_connection((host, int(port)), timeout=30) as conn:
        conn.sendall(head.encode())
        opening = b'--b\r\nContent-Disposition: form-data; name="image"; filename="g.png"\r\n\r\n'
        try:
            conn.sendall(opening if declared else b"%x\r\n%s\r\n" % (len(opening), opening))
            while sent < total and not select.select([conn], [], [], 0.02)[0]:
                conn.sendall(piece if declared else b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return conn.recv(200), sent


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_an_oversized_upload_is_refused_before_it_is_read_in_full(served: str, declared: bool) -> None:
    """413 as soon as the 20 MiB limit is passed (before, a 280 MiB upload was spooled to disk first); a declared
    length over the limit is refused before any of the body is read."""
    total = 200 << 20
    answer, sent = _upload_until_answered(served, total if declared else None, total)
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert sent < (64 << 20 if not declared else 8 << 20), sent
    assert httpx.get(f"{served}/healthz").status_code == 200


def test_every_answer_is_counted_and_timed(client: TestClient, guide_png: bytes) -> None:
    """404s, 405s and refusals are counted by status and their time observed, not only successes."""
    before = client.get("/metrics").text
    client.get("/nowhere"), client.put("/v1/translate"), post(client, guide_png, ["a"], steps="2", seed="x")
    after = client.get("/metrics").text

    def value(text: str, series: str) -> float:
        line = next((line for line in text.splitlines() if line.startswith(series + " ")), f"{series} 0")
        return float(line.split()[-1])
    for series in ('pnp_requests_total{status="404"}', 'pnp_requests_total{status="405"}',
                   'pnp_requests_total{status="422"}'):
        assert value(after, series) == value(before, series) + 1, series
    assert value(after, "pnp_request_seconds_count") == value(before, "pnp_request_seconds_count") + 3


@pytest.mark.parametrize("accept,png", [("image/png", True), ("image/png;q=0", False), ("*/*", False),
                                        ("application/json;q=0.5, image/png", True),
                                        ("image/png;q=0.2, application/json", False)])
def test_accept_is_read_with_its_weights(accept: str, png: bool) -> None:
    from pnp_trt.serve.app import wants_png

    assert wants_png(accept) == png


@pytest.mark.parametrize("accept,json_ok", [("", True), ("image/png", False), ("image/png, */*;q=0.1", True),
                                            ("application/json;q=0", False), ("application/*", True)])
def test_json_acceptability_is_read_with_its_weights(accept: str, json_ok: bool) -> None:
    from pnp_trt.serve.app import accepts_json

    assert accepts_json(accept) == json_ok


def test_two_image_fields_are_refused_as_such(client: TestClient, guide_png: bytes) -> None:
    response = client.post("/v1/translate", files=[("image", ("a.png", guide_png)), ("image", ("b.png", guide_png))],
                           data={"prompt": "a"})
    assert response.status_code == 422 and response.json()["error"].startswith("the image field is given more")


def test_a_repeated_setting_is_refused(client: TestClient, guide_png: bytes) -> None:
    response = client.post("/v1/translate", files={"image": ("g.png", guide_png)},
                           data={"prompt": "a", "steps": ["2", "3"]})
    assert response.status_code == 422 and "steps field is given more than once" in response.json()["error"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI") != "true", reason="Debian's chromium not installed")
def test_the_page_translates_in_headless_chromium(served: str, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    image = random_image(tmp_path / "guide.png", 128, 64)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto(served)
            assert page.is_hidden("#guidance-figure")  # no broken-image placeholder before an upload
            page.set_input_files("#image", str(image))
            assert page.is_visible("#guidance-figure")
            page.fill("#prompts", "a photo of a cat\na painting of a dog")
            page.fill("#steps", "2")
            page.fill("#height", "64")
            page.fill("#width", "128")
            page.click("#go")
            page.wait_for_selector("#results img.result >> nth=1", timeout=60_000)
            assert "UNet evaluations" in page.inner_text("#status")
            assert page.eval_on_selector("#guidance", "img => img.naturalWidth") == 128
            page.screenshot(path=str(tmp_path / "page.png"))
        finally:
            browser.close()


def _huge_header_png() -> bytes:
    """A valid 64×64 PNG whose header claims 20,000 × 20,000 pixels (a few hundred bytes in all)."""
    import struct
    import zlib

    data = bytearray(_png(Image.new("RGB", (64, 64))))
    ihdr = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _bad_idat_crc(png: bytes) -> bytes:
    from pnp_trt.png_chunks import SIGNATURE, chunks

    return SIGNATURE + b"".join(c[:-4] + bytes(4) if kind == b"IDAT" else c for kind, c in chunks(png))


def corpus(guide: bytes) -> list[tuple[str, dict, int, str]]:
    """(name, request kwargs for httpx, expected status, text in the error)."""
    image = {"image": ("g.png", guide, "image/png")}
    ok = {"prompt": "a cat", **SETTINGS}

    def form(**changes: object) -> dict:
        return {"files": image, "data": {**ok, **changes}}

    return [
        ("truncated image", {"files": {"image": ("g.png", guide[:300])}, "data": ok}, 415, "damaged PNG"),
        ("image data failing its checksum", {"files": {"image": ("g.png", _bad_idat_crc(guide))}, "data": ok}, 415,
         "damaged PNG (its IDAT chunk fails its checksum)"),  # corpus round 10: the CLI's checks, not the server's
        ("a second header", {"files": {"image": ("g.png", guide[:8] + guide[8:33] + guide[8:])}, "data": ok}, 415,
         "its header (IHDR) is not its one first chunk"),
        ("text as image", {"files": {"image": ("g.png", b"hello world")}, "data": ok}, 415, "not an image"),
        ("empty file", {"files": {"image": ("g.png", b"")}, "data": ok}, 415, "not an image"),
        ("huge dimensions, small file", {"files": {"image": ("g.png", _huge_header_png())}, "data": ok}, 413,
         "16 Mpx limit (its header says 400 Mpx)"),
        ("tiny image", {"files": {"image": ("g.png", _png(Image.new("RGB", (8, 8))))}, "data": ok}, 422,
         "at least 64 px"),
        ("upload over the limit", {"files": {"image": ("g.png", guide + bytes(21 * 2**20))}, "data": ok}, 413,
         "the request is over this server's limit"),
        ("5 MB prompt", form(prompt="x" * 5 * 2**20), 422, "5242880 characters"),
        ("prompt as a file part", {"files": [("image", ("g.png", guide)), ("prompt", ("p.txt", b"a cat"))],
                                   "data": SETTINGS}, 422, "unexpected file field 'prompt'"),
        ("three file parts", {"files": [("image", ("g.png", guide))] * 3, "data": ok}, 422, "several file parts"),
        ("blank source prompt", {"data": {**ok, "source_prompt": "   "}}, 422, "source_prompt must not be empty"),
        ("steps 0", form(steps="0"), 422, "steps must be at least 1"),  # K: the field, not --steps
        ("steps negative", form(steps="-3"), 422, "at least 1"),
        ("steps NaN", form(steps="nan"), 422, "must be int"),
        ("steps with an underscore", form(steps="1_0"), 422, "must be int, got '1_0'"),
        ("steps in Arabic-Indic digits", form(steps="\u0662"), 422, "must be int"),
        ("guidance scale with an underscore", form(guidance_scale="7_5"), 422, "must be float"),
        ("steps over the limit", form(steps="5000"), 422, "limit of 100"),
        ("guidance scale NaN", form(guidance_scale="nan"), 422, "finite"),
        ("guidance scale inf", form(guidance_scale="inf"), 422, "finite"),
        ("source guidance scale -inf", form(source_guidance_scale="-inf"), 422, "finite"),
        ("feature injection negative", form(feature_injection="-0.1"), 422, "between 0 and 1"),
        ("attention injection 1.5", form(attention_injection="1.5"), 422,
         "attention_injection must be between 0 and 1"),
        ("seed negative", form(seed="-1"), 422, "between 0 and 4294967295"),
        ("height not a multiple of 64", form(height="100"), 422, "height must be a multiple of 64"),
        ("width zero", form(width="0"), 422, "multiple of 64"),
        ("output too large", form(height="4096", width="4096"), 422,
         "Mpx limit; ask for a smaller height and width (the limit is this server's)"),
        ("prompt batch size 0", form(prompt_batch_size="0"), 422, "prompt_batch_size must be between 1 and 1024"),
        ("inversion steps that miss timesteps", form(inversion_steps="3"), 422, "never visits"),
        ("unknown field", form(strength="0.5"), 422, "unknown field(s) strength"),
        ("empty prompt", form(prompt=""), 422, "prompt 1 must not be empty"),
        ("no prompt", {"files": image, "data": SETTINGS}, 422, "non-empty prompt"),
        ("10,000 prompts", {"files": image, "data": {**SETTINGS, "prompt": ["a"] * 10_000}}, 413, "too many"),
        ("9 prompts", {"files": image, "data": {**SETTINGS, "prompt": ["a"] * 9}}, 422, "limit of 8"),
        ("1 MB prompt", form(prompt="x" * 2**20), 422, "characters"),
        ("1 MB negative prompt", form(negative_prompt="x" * 2**20), 422, "characters"),
        ("no guidance", {"data": ok}, 422, "exactly one guidance"),
        ("two guidances", form(source_prompt="a castle"), 422, "exactly one guidance"),
        ("image as a text field", {"data": {**ok, "image": "photo.jpg"}}, 415, "file upload"),
        ("file under another name", {"files": {"photo": ("g.png", guide)}, "data": ok}, 422, "unexpected file"),
        ("JSON body", {"json": {"prompt": "a cat"}}, 415, "multipart/form-data"),
        ("plain text body", {"content": b"prompt=a", "headers": {"content-type": "text/plain"}}, 415, "multipart"),
        ("broken multipart", _raw_form(b"--x\r\nnonsense"), 422, "cut short"),
        ("media type with a suffix", _raw_form(_text_part(b"source_prompt", b"a") + b"--x--\r\n",
                                               "multipart/form-datax"), 415, "multipart/form-data"),  # round 8
        ("media type in mixed case", _raw_form(_text_part(b"source_prompt", b"a") + b"--x--\r\n",
                                               "Multipart/Form-Data"), 422, "non-empty prompt"),  # round 8
        ("form cut before its end", _raw_form(_text_part(b"prompt", b"a cat")), 422, "cut short"),
        ("prompt not UTF-8", _raw_form(_text_part(b"prompt", b"caf\xe9") + b"--x--\r\n"), 422,
         "prompt field is not UTF-8"),
        ("URL-encoded prompt not UTF-8", {"content": b"prompt=caf%E9&source_prompt=b",
                                          "headers": {"content-type": "application/x-www-form-urlencoded"}}, 422,
         "prompt field is not UTF-8"),
    ]


def _text_part(name: bytes, value: bytes) -> bytes:
    return b'--x\r\nContent-Disposition: form-data; name="' + name + b'"\r\n\r\n' + value + b"\r\n"


def _raw_form(body: bytes, media_type: str = "multipart/form-data") -> dict:
    return {"content": body, "headers": {"content-type": f"{media_type}; boundary=x"}}


def test_a_bad_request_corpus_against_the_running_server(served: str, guide_png: bytes) -> None:
    """Every case answered with its documented status and a one-line JSON error; healthy afterwards."""
    cases = corpus(guide_png)
    assert len(cases) >= 25
    with httpx.Client(base_url=served, timeout=60) as client:
        for name, request, status, message in cases:
            response = client.post("/v1/translate", **request)
            assert response.status_code == status, (name, response.text[:200])
            error = response.json()["error"]
            assert message.lower() in error.lower() and "\n" not in error, (name, error)
            assert "--" not in error, (name, error)  # K: a client sends fields; CLI flags are not its words
        wrong_method = client.get("/v1/translate")
        assert wrong_method.status_code == 405 and "error" in wrong_method.json()
        assert client.get("/healthz").json()["status"] == "ok"
        assert client.post("/v1/translate", files={"image": ("g.png", guide_png)},
                           data={"prompt": "a cat", **SETTINGS}).status_code == 200


def test_a_slow_upload_does_not_hold_up_other_requests(served: str, guide_png: bytes) -> None:
    """A client trickling its body (slow-loris) while another request is served in full."""
    host, port = served.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as slow:
        slow.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 100000\r\n\r\n--b\r\n")
        for _ in range(5):
            slow.sendall(b"x")
            time.sleep(0.1)
        started = time.monotonic()
        answer = httpx.post(f"{served}/v1/translate", files={"image": ("g.png", guide_png)},
                            data={"prompt": "a dog", **SETTINGS}, timeout=60)
        assert answer.status_code == 200 and time.monotonic() - started < 30


def test_a_stalled_upload_is_answered_at_the_deadline(exported: Path) -> None:
    """Corpus 12: a body that stops arriving (half of its declared length sent) was never answered."""
    with serving(exported, "--deadline-s", "2") as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as stalled:
            stalled.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                            b"boundary=b\r\nContent-Length: 1000\r\n\r\n--b\r\n" + b"x" * 400)
            answer = ""
            while not answer.endswith("}"):  # headers and body may come in separate packets
                piece = stalled.recv(4096).decode("latin-1")
                if not piece:
                    break
                answer += piece
        assert answer.startswith("HTTP/1.1 408") and "did not arrive in full within this server's 2 s" in answer
        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"


def _series(text: str, series: str) -> float:
    line = next((line for line in text.splitlines() if line.startswith(series + " ")), f"{series} 0")
    return float(line.split()[-1])


def _wait_for_series(url: str, series: str, value: float, seconds: float = 60) -> bool:
    """Whether `series` on the server's /metrics reaches `value` within `seconds` (a loaded machine is slow)."""
    deadline = time.monotonic() + seconds
    while _series(httpx.get(f"{url}/metrics").text, series) < value:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_client_that_leaves_stops_its_translation(exported: Path, guide_png: bytes) -> None:
    """Corpus 12 H70, corpus 14 H11/H41: a client that closed its connection kept its translation running, and
    the next request waited for it. Its work now stops at the next step (had it run on, its UNet evaluations
    would be counted) and its request counts as a 499. 500 steps: a valid request that runs for seconds (1000
    is refused at once, for this model, which raced the client's leaving)."""
    with serving(exported, "--max-steps", "500", "--workers", "1") as url:
        long = httpx.Request("POST", f"{url}/v1/translate", files={"image": ("g.png", guide_png)},
                             data={**SETTINGS, "prompt": "a cat", "steps": "500"})
        head = "".join(f"{k}: {v}\r\n" for k, v in long.headers.items() if k.lower() != "host")
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as leaving:
            leaving.sendall(f"POST /v1/translate HTTP/1.1\r\nHost: x\r\n{head}\r\n".encode() + long.read())
            assert _wait_for_series(url, "pnp_queue_depth", 1), "the long request was never queued"
        assert _wait_for_series(url, 'pnp_requests_total{status="499"}', 1), "the client's leaving went unnoticed"
        answer = httpx.post(f"{url}/v1/translate", files={"image": ("g.png", guide_png)},
                            data={**SETTINGS, "prompt": "a dog"}, timeout=120)
        assert answer.status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
        assert _series(metrics, "pnp_unet_evaluations_total") == answer.json()["unet_evaluations"]
        assert _series(metrics, 'pnp_requests_total{status="422"}') == 0


def _ray_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.serve") is not None


@pytest.mark.skipif(not _ray_available(), reason="Ray Serve not installed (pip install -e '.[ray]')")
def test_ray_serve_spreads_requests_and_restarts_a_killed_replica(exported: Path, guide_png: bytes,
                                                                  tmp_path: Path) -> None:
    """`pnp-trt serve --ray --replicas 2`: both model replicas answer (a second image goes to the other replica,
    the same image back to the one holding its source); after one replica's process is killed every request
    gets an answer — its images or a JSON 503 — none hangs, and Ray brings a new replica up. SIGTERM then stops
    it as the shell expects (exit 143, one line; Ray's native handler printed a stack dump)."""
    port = _free_port()
    log = tmp_path / "serve.log"
    process = subprocess.Popen([sys.executable, "-m", "pnp_trt.cli", "serve", "--engines", str(exported), "--port",
                                str(port), "--ray", "--replicas", "2"], stdout=subprocess.DEVNULL,
                               stderr=log.open("w"), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, 180)

        def ask(prompt: str, seed: int) -> httpx.Response:  # the inversion prompt is part of a source's key
            return httpx.post(f"{url}/v1/translate", files={"image": ("g.png", guide_png)},
                              data={"prompt": prompt, "inversion_prompt": f"a photo {seed}", **SETTINGS},
                              timeout=120)

        served: set[str] = set()
        for round_ in range(5):
            answers = in_threads([lambda i=10 * round_ + i: ask(f"p{i}", i) for i in range(8)])
            served |= {r.json()["served_by"] for r in answers}
            if len(served) == 2:
                break
        assert len(served) == 2, served
        holder = ask("again", 0).json()["served_by"]
        assert all(ask(f"again {i}", 0).json()["served_by"] == holder for i in range(3))  # affinity
        victim = sorted(served)[0]
        os.kill(int(victim.split(":")[1]), signal.SIGKILL)
        after, deadline, first = set(), time.monotonic() + 120, 1000
        while time.monotonic() < deadline and not after - served:
            answers = in_threads([lambda seed=first + i: ask("q", seed) for i in range(4)])
            first += 4
            assert all(a.status_code == 200 or (a.status_code == 503 and "stopped" in a.json()["error"])
                       for a in answers), [a.text[:200] for a in answers]
            after |= {a.json()["served_by"] for a in answers if a.status_code == 200}
        assert after - served, f"no restarted replica answered within 120 s: {after}"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=90) == 143
        assert "stopped serving" in log.read_text() and "SIGTERM received" not in log.read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):  # after the SIGTERM above the group may be gone
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)


def _wait_healthy(url: str, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None, "the server process exited"
        time.sleep(0.2)
    raise AssertionError(f"{url} not healthy within {seconds} s")


def test_a_deadline_travels_as_seconds_left_and_stops_work_there() -> None:
    """What a Ray model replica receives from the gateway: the seconds left, from which its own check stops its
    translation at the next step once nobody waits (a 504'd request kept its replica busy before)."""
    from pnp_trt.serve.batching import DeadlineCheck, DeadlineExceeded

    gateway = DeadlineCheck.within(30)
    replica = DeadlineCheck.within(gateway.seconds_left())
    advance = replica("inject", 10)
    advance()
    assert 29 < replica.seconds_left() <= 30
    with pytest.raises(DeadlineExceeded, match="past the deadline in invert"):
        DeadlineCheck.within(-0.001)("invert", 10)


def test_sighup_stops_the_server_as_sigterm_does(exported: Path, tmp_path: Path) -> None:
    """A closed terminal (SIGHUP) stops `pnp-trt serve` gracefully, as SIGTERM does (it raised into uvicorn's loop:
    two CancelledError tracebacks)."""
    port = _free_port()
    log = tmp_path / "serve.log"
    process = subprocess.Popen([sys.executable, "-m", "pnp_trt.cli", "serve", "--engines", str(exported),
                                "--port", str(port)], stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        _wait_healthy(f"http://127.0.0.1:{port}", process, 60)
        process.send_signal(signal.SIGHUP)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert "Traceback" not in log.read_text() and "Shutting down" in log.read_text(), log.read_text()[-2000:]


def test_ray_replicas_that_reserve_more_gpus_than_the_cluster_has_are_refused() -> None:
    """Corpus 11: `--ray --gpus-per-replica 1` on a machine without a GPU said "loading" forever."""
    from pnp_trt.cli import _check_ray_gpus
    from pnp_trt.errors import PnPError

    with pytest.raises(PnPError, match=r"--replicas 1 × --gpus-per-replica 1 need 1 GPUs, and the Ray cluster has 0"):
        _check_ray_gpus(0, 1, 1.0)
    with pytest.raises(PnPError, match="need 2 GPUs"):
        _check_ray_gpus(1, 2, 1.0)
    _check_ray_gpus(2, 2, 1.0)
    _check_ray_gpus(0, 3, 0.0)
