"""Triton requests from the Triton venv (`.triton-venv`, where tritonclient lives: its gRPC half pins a protobuf
that Ray's cannot share), for `tests/test_triton.py`. Reads a JSON job on stdin, prints one JSON answer per
request on stdout: {"images": [base64 PNG...], "record": {...}} or {"error": "..."}.

Job: {"protocol": "http"|"grpc", "address": "127.0.0.1:PORT", "concurrent": bool, "requests": [{"image": base64
| null, "source_prompt": str | null, "prompts": [...], "settings": {"STEPS": 2, ...}, "types": {"STEPS": "FP32"}}]}
(`types` overrides a setting's tensor type, to send a mistyped one)."""

from __future__ import annotations

import base64
import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

DTYPES = {"INT64": np.int64, "FP32": np.float32}


def inputs(module, request: dict) -> list:
    arrays = {"PROMPT": (np.array([[p.encode() for p in request["prompts"]]], dtype=np.object_), "BYTES")}
    if request.get("image") is not None:
        arrays["IMAGE"] = (np.array([[base64.b64decode(request["image"])]], dtype=np.object_), "BYTES")
    if request.get("source_prompt") is not None:
        arrays["SOURCE_PROMPT"] = (np.array([[request["source_prompt"].encode()]], dtype=np.object_), "BYTES")
    for name, value in request["settings"].items():
        kind = request.get("types", {}).get(name, "FP32" if isinstance(value, float) else "INT64")
        arrays[name] = (np.array([[value]], dtype=DTYPES[kind]), kind)
    tensors = []
    for name, (array, kind) in arrays.items():
        tensor = module.InferInput(name, list(array.shape), kind)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def main() -> None:
    job = json.load(sys.stdin)
    if job["protocol"] == "http":
        import tritonclient.http as module
    else:
        import tritonclient.grpc as module
    from tritonclient.utils import InferenceServerException

    local = threading.local()

    def ask(request: dict) -> dict:
        if not hasattr(local, "client"):  # a client per thread: they are not shared between threads
            local.client = module.InferenceServerClient(job["address"], **(
                {"network_timeout": 600} if job["protocol"] == "http" else {}))
        try:
            result = local.client.infer("pnp_trt", inputs(module, request))
        except InferenceServerException as exc:
            return {"error": exc.message()}
        return {"images": [base64.b64encode(png).decode() for png in result.as_numpy("IMAGES")[0]],
                "record": json.loads(result.as_numpy("RECORD")[0, 0])}

    workers = len(job["requests"]) if job.get("concurrent") else 1
    with ThreadPoolExecutor(workers) as pool:
        answers = list(pool.map(ask, job["requests"]))
    json.dump(answers, sys.stdout)


if __name__ == "__main__":
    main()
