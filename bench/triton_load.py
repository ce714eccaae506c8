"""Load against a real Triton Inference Server serving `pnp-trt triton-repo` (tiny model, ONNX Runtime CPU), and
the same load against `pnp-trt serve` in the same run, side by side.

    python bench/triton_load.py [--requests 500] [--concurrency 8] [--venv .triton-venv]

Triton is the tritonserver of nvidia-pytriton (`tools/pytriton-tritonserver.sh`), from the venv the Triton tests
make (`.triton-venv`: `python -m pytest tests/test_triton.py` once), whose tritonclient sends the requests (this
script again, `--client`, in that venv): gRPC, a client per worker thread, 1 prompt each, 16 guidance images in
turn; reported: requests/s, p50/p99 latency, failures, the server's RSS (tritonserver and its Python-backend
stub together) before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"STEPS": 2, "HEIGHT": 64, "WIDTH": 128}


def start_triton(repository: Path, venv: Path, log: Path) -> tuple[subprocess.Popen, int]:
    import httpx
    from serve_load import free_port

    http, grpc, metrics = free_port(), free_port(), free_port()
    process = subprocess.Popen([str(ROOT / "tools" / "pytriton-tritonserver.sh"), str(repository), str(http),
                                str(grpc), str(metrics)], env={**os.environ, "VENV": str(venv)},
                               stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{http}/v2/models/pnp_trt/ready", timeout=5).status_code == 200:
                return process, grpc
        except httpx.TransportError:  # not listening yet
            pass
        if process.poll() is not None:
            raise SystemExit(f"tritonserver exited: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    raise SystemExit(f"tritonserver not ready in 180 s: {log.read_text()[-2000:]}")


def group_rss_mib(pid: int) -> float:
    """RSS of the server and its children (the Python backend runs the model in a stub process)."""
    from serve_load import rss_mib

    children = subprocess.run(["pgrep", "-g", str(os.getpgid(pid))], capture_output=True, text=True).stdout.split()
    return sum(rss_mib(int(child)) for child in children)


def triton_load(port: int, requests: int, concurrency: int, images: list[bytes]) -> None:
    """In the Triton venv (tritonclient): the load, its summary printed."""
    import tritonclient.grpc as module

    images_n, local = len(images), threading.local()

    def one(i: int) -> tuple[bool, float]:
        if not hasattr(local, "client"):
            local.client = module.InferenceServerClient(f"127.0.0.1:{port}")
        arrays = {"IMAGE": np.array([[images[i % images_n]]], dtype=np.object_),
                  "PROMPT": np.array([[f"prompt {i % 16}".encode()]], dtype=np.object_),
                  **{name: np.array([[value]], dtype=np.int64) for name, value in SETTINGS.items()}}
        inputs = []
        for name, array in arrays.items():
            tensor = module.InferInput(name, list(array.shape), "BYTES" if array.dtype == np.object_ else "INT64")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        start = time.perf_counter()
        try:
            local.client.infer("pnp_trt", inputs)
            return True, time.perf_counter() - start
        except Exception:
            return False, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    latencies = sorted(seconds for ok, seconds in results if ok)
    print(f"    {requests} requests at concurrency {concurrency}: {sum(not ok for ok, _ in results)} failed, "
          f"{requests / wall:.1f} requests/s, p50 {np.percentile(latencies, 50) * 1000:.0f} ms, "
          f"p99 {np.percentile(latencies, 99) * 1000:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--venv", type=Path, default=ROOT / ".triton-venv")
    parser.add_argument("--client", nargs=4, help=argparse.SUPPRESS)  # PORT REQUESTS CONCURRENCY IMAGES_DIR
    args = parser.parse_args()
    if args.client:
        port, requests, concurrency, folder = args.client
        triton_load(int(port), int(requests), int(concurrency),
                    [p.read_bytes() for p in sorted(Path(folder).glob("*.png"))])
        return
    from serve_load import free_port, load, png, rss_mib, start_server, stop_server

    if not (args.venv / "bin" / "python").exists():
        raise SystemExit(f"no Triton venv at {args.venv}: run `python -m pytest tests/test_triton.py` once")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; tiny model, ONNX Runtime CPU, 64x128, 2 steps, "
          f"1 prompt per request, {args.images} guidance images in turn, loopback")
    with tempfile.TemporaryDirectory() as tmp:
        model, engines, repository = Path(tmp) / "tiny", Path(tmp) / "tiny-onnx", Path(tmp) / "models"
        for command in (["make-tiny-model", str(model)], ["export", "--model", str(model), "--out", str(engines)]):
            subprocess.run([sys.executable, "-m", "pnp_trt.cli", *command], check=True, capture_output=True)
        repository.mkdir()
        subprocess.run([sys.executable, "-m", "pnp_trt.cli", "triton-repo", str(repository), "--engines",
                        str(engines)], check=True, capture_output=True)
        images = Path(tmp) / "images"
        images.mkdir()
        for i in range(args.images):
            (images / f"{i:03d}.png").write_bytes(png(i))
        process, port = start_triton(repository, args.venv, Path(tmp) / "triton.log")

        def client(requests: int) -> None:
            subprocess.run([str(args.venv / "bin" / "python"), __file__, "--client", str(port), str(requests),
                            str(args.concurrency), str(images)], check=True)
        try:
            print("Triton (nvidia-pytriton's tritonserver 2.51, Python backend, dynamic batching, gRPC):")
            before = group_rss_mib(process.pid)
            client(8)  # warm-up: sessions are made at first use
            client(args.requests)
            print(f"    server RSS: {before:.0f} MiB before, {group_rss_mib(process.pid):.0f} MiB after")
        finally:
            os.killpg(process.pid, 15)
            process.wait(timeout=60)
        http_port = free_port()
        server = start_server(engines, http_port, ray=False)
        try:
            print("pnp-trt serve (one uvicorn process, HTTP):")
            before = rss_mib(server.pid)
            url = f"http://127.0.0.1:{http_port}"
            asyncio.run(load(url, 8, 8, args.images))
            asyncio.run(load(url, args.requests, args.concurrency, args.images))
            print(f"    server RSS: {before:.0f} MiB before, {rss_mib(server.pid):.0f} MiB after")
        finally:
            stop_server(server, ray=False)


if __name__ == "__main__":
    main()
