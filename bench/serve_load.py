"""Load against a real `pnp-trt serve` process on loopback (tiny model, ONNX Runtime CPU): bounded request
count, then it stops by itself.

    python bench/serve_load.py [--requests 1000] [--concurrency 8] [--ray]

Phases: (1) coalescing — 8 concurrent requests on one image vs 8 on eight images (wall time, translations
and UNet evaluations from /metrics); (2) N requests at concurrency C (status
counts, p50/p99 latency, requests/s, server RSS before/after; 16 images in turn by default, 1 prompt each);
with --ray the same on `--ray --replicas 2`,
killing one replica's process a third of the way in (failures, their bodies, time until a new replica serves).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from common import guide_image

SETTINGS = {"steps": "2", "height": "64", "width": "128"}


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    image = guide_image(128).resize((128, 64))
    pixels = np.asarray(image).copy()
    pixels[:, :, seed % 3] = (pixels[:, :, seed % 3].astype(np.int64) + 40 * seed) % 256  # another picture
    from PIL import Image
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(engines: Path, port: int, ray: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", "pnp_trt.cli", "serve", "--engines", str(engines), "--port", str(port),
               "--queue", "64"]
    if ray:
        command += ["--ray", "--replicas", "2"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become healthy")


def stop_server(process: subprocess.Popen, ray: bool) -> None:
    os.killpg(process.pid, signal.SIGINT if ray else signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    if ray:
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"], capture_output=True)


async def one(client: httpx.AsyncClient, url: str, image: bytes, prompt: str) -> tuple[int, float, dict]:
    start = time.perf_counter()
    try:
        response = await client.post(f"{url}/v1/translate", files={"image": ("g.png", image)},
                                     data={"prompt": prompt, **SETTINGS}, timeout=120)
        try:
            body = response.json()
        except ValueError:
            body = {"not json": response.text[:80]}
        return response.status_code, time.perf_counter() - start, body
    except httpx.TransportError as exc:
        return 0, time.perf_counter() - start, {"transport": type(exc).__name__}


def metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


async def coalescing(url: str) -> None:
    async with httpx.AsyncClient() as client:
        await one(client, url, png(99), "warm-up")  # sessions are created at first use
        for label, images in (("one image", [png(100)] * 8), ("eight images", [png(200 + i) for i in range(8)])):
            before = (await client.get(f"{url}/metrics")).text
            start = time.perf_counter()
            results = await asyncio.gather(*(one(client, url, image, f"prompt {i}") for i, image in enumerate(images)))
            wall = time.perf_counter() - start
            after = (await client.get(f"{url}/metrics")).text
            translations = metric(after, "pnp_translations_total") - metric(before, "pnp_translations_total")
            evals = metric(after, "pnp_unet_evaluations_total") - metric(before, "pnp_unet_evaluations_total")
            ok = sum(status == 200 for status, _, _ in results)
            print(f"    8 concurrent on {label:<12}: {wall:6.2f} s, {ok}/8 ok, {translations:.0f} translation(s), "
                  f"{evals:.0f} UNet evaluations")


async def load(url: str, requests: int, concurrency: int, images_n: int, kill_at: int | None = None) -> None:
    images = [png(i) for i in range(images_n)]
    gate, results, served = asyncio.Semaphore(concurrency), [], set()
    killed: dict[str, float] = {}

    async def worker(i: int, client: httpx.AsyncClient) -> None:
        async with gate:
            if kill_at is not None and i == kill_at and served:
                victim = sorted(served)[0]
                os.kill(int(victim.split(":")[1]), signal.SIGKILL)
                killed.update(by=victim, at=time.perf_counter(), before=set(served))
            status, seconds, body = await one(client, url, images[i % images_n], f"prompt {i % 16}")
            results.append((status, seconds, body, time.perf_counter()))
            if status == 200:
                served.add(body["served_by"])

    start = time.perf_counter()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(worker(i, client) for i in range(requests)))
    wall = time.perf_counter() - start
    latencies = sorted(seconds for status, seconds, _, _ in results if status == 200)
    failures = [(status, body) for status, _, body, _ in results if status != 200]
    print(f"    {requests} requests at concurrency {concurrency}: {len(failures)} failed, "
          f"{requests / wall:.1f} requests/s, p50 {np.percentile(latencies, 50) * 1000:.0f} ms, "
          f"p99 {np.percentile(latencies, 99) * 1000:.0f} ms; served by {len(served)} process(es)")
    kinds: dict[str, int] = {}
    for status, body in failures:
        kind = f"{status} {'JSON error' if 'error' in body else body}"
        kinds[kind] = kinds.get(kind, 0) + 1
    for kind, count in kinds.items():
        print(f"      failed: {count} × {kind}")
    if killed:
        after = [(t, body["served_by"]) for status, _, body, t in results if status == 200 and t > killed["at"]]
        new = [t for t, by in after if by not in killed["before"]]
        recovery = f"{min(new) - killed['at']:.1f} s" if new else "not within the run"
        print(f"      killed replica {killed['by']} at request {kill_at}: {len(after)} answers after it; a "
              f"restarted replica first answered after {recovery}")


def run(engines: Path, args: argparse.Namespace, ray: bool) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(engines, port, ray)
    try:
        print(f"{'Ray Serve, 2 replicas' if ray else 'one uvicorn process'} ({url}):")
        before = rss_mib(process.pid)
        asyncio.run(coalescing(url))
        asyncio.run(load(url, args.requests, args.concurrency, args.images, args.requests // 3 if ray else None))
        if not ray:
            print(f"    server RSS: {before:.0f} MiB before, {rss_mib(process.pid):.0f} MiB after")
        print(f"    healthy afterwards: {httpx.get(f'{url}/healthz', timeout=5).status_code == 200}")
    finally:
        stop_server(process, ray)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--images", type=int, default=16, help="guidance images the requests take in turn")
    parser.add_argument("--ray", action="store_true", help="also run against --ray --replicas 2")
    args = parser.parse_args()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; tiny model, ONNX Runtime CPU, 64x128, 2 steps, "
          f"1 prompt per request, {args.images} guidance images in turn, loopback")
    with tempfile.TemporaryDirectory() as tmp:
        model, engines = Path(tmp) / "tiny", Path(tmp) / "tiny-onnx"
        subprocess.run([sys.executable, "-m", "pnp_trt.cli", "make-tiny-model", str(model)], check=True,
                       capture_output=True)
        subprocess.run([sys.executable, "-m", "pnp_trt.cli", "export", "--model", str(model), "--out", str(engines)],
                       check=True, capture_output=True)
        run(engines, args, ray=False)
        if args.ray:
            run(engines, args, ray=True)


if __name__ == "__main__":
    main()
