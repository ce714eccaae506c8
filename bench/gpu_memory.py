"""Working memory of one UNet sample on CUDA (torch fp16, SD 2.1-base shapes, random weights), to size the
default prompt batch: peak allocation of an injection pass at several batches, per sample, and its ratio to
one step's captured features (`engines.buffers.ACTIVATION_PER_FEATURE_BYTE`).

    python bench/gpu_memory.py [--size 512]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from pnp_trt.contract import axis_sizes, graph_specs, injected_name
from pnp_trt.engines.buffers import ACTIVATION_PER_FEATURE_BYTE, feature_bytes
from pnp_trt.export.trace_feeds import random_feeds
from pnp_trt.random_models import random_model
from pnp_trt.runtime.torch_backend import open_torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()
    model = open_torch(random_model("sd", 0, torch.device("cuda"), torch.float16))
    spec = graph_specs(model.dims)["unet"]
    peaks = {}
    for batch in (2, 4, 8, 16):
        feeds = random_feeds(spec, axis_sizes(model.dims, batch, args.size, args.size), "float16", 0)
        feeds = {k: model.backend.asarray(v) if v.dtype != np.bool_ else v for k, v in feeds.items()}
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        outputs = model.backend.run("unet", feeds)
        torch.cuda.synchronize()
        peaks[batch] = torch.cuda.max_memory_allocated() - base
        del outputs
    per_sample = (peaks[16] - peaks[2]) / 14
    features = feature_bytes(model.dims, args.size, args.size, "float16")
    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.size}x{args.size} fp16, "
          f"injected points {len(model.dims.points)} ({injected_name(model.dims.points[0])}, ...)")
    print("peak working memory per injection pass: " + ", ".join(f"batch {b}: {p / 2**30:.2f} GiB"
                                                                 for b, p in peaks.items()))
    print(f"per sample: {per_sample / 2**20:.0f} MiB; one step's features: {features / 2**20:.1f} MiB; ratio "
          f"{per_sample / features:.0f} (the default-batch heuristic assumes {ACTIVATION_PER_FEATURE_BYTE})")


if __name__ == "__main__":
    main()
