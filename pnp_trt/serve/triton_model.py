"""pnp-trt as a model of Triton Inference Server's Python backend: the `TritonPythonModel` that the model.py
written by `pnp-trt triton-repo` re-exports. A thin layer over `Translator`: one per model instance, loaded in
`initialize` (a failure leaves the model not ready, the server log saying why in one line), requests checked
as `pnp-trt serve` checks them (`requests.check_request`), those of a dynamic batch that share a guidance and
settings run as one translation. Imports `triton_python_backend_utils`, which exists only inside Triton."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import triton_python_backend_utils as pb_utils

from ..errors import PnPError
from .limits import ServeOptions, client_words
from .requests import CheckedRequest, check_request, share_of
from .triton_io import INPUTS, request_fields, response_arrays


class TritonPythonModel:
    def initialize(self, args: Mapping[str, str]) -> None:
        parameters = json.loads(args["model_config"]).get("parameters", {})
        options = ServeOptions.parse({key: value["string_value"] for key, value in parameters.items()})
        if args.get("model_instance_kind") == "GPU":
            import torch
            torch.cuda.set_device(int(args.get("model_instance_device_id", 0)))
        try:
            self.translator = options.load()
        except PnPError as exc:  # Triton logs the message; the model stays not ready
            raise pb_utils.TritonModelException(f"pnp-trt could not load the model: {exc}") from None
        self.limits = options.limits()
        self._metric_families, self.metrics = _metrics(args.get("model_name", "pnp_trt"))  # families outlive metrics

    def execute(self, requests: list[Any]) -> list[Any]:
        """One response per request, in order; requests of this batch on the same guidance and settings share a
        translation (each gets its own prompts' images back)."""
        responses: list[Any] = [None] * len(requests)
        groups: dict[str, list[tuple[int, CheckedRequest]]] = {}
        for index, request in enumerate(requests):
            try:
                checked = check_request(*request_fields(_arrays(request)), self.translator.model, self.limits)
            except PnPError as exc:  # the client's error: Triton's 400 / INVALID_ARGUMENT
                responses[index] = _error(client_words(exc), pb_utils.TritonError.INVALID_ARG)
            else:
                groups.setdefault(checked.key, []).append((index, checked))
        for members in groups.values():
            self._translate(members, responses)
        return responses

    def _translate(self, members: list[tuple[int, CheckedRequest]], responses: list[Any]) -> None:
        first = members[0][1]
        prompts = [prompt for _, checked in members for prompt in checked.prompts]
        try:
            result = self.translator.translate(prompts, first.image, first.source_prompt,
                                               **first.config.to_dict())
        except Exception as exc:  # a bad request has been answered already: this is the server's own failure
            message = client_words(exc)
            for index, _ in members:
                responses[index] = _error(f"the translation failed: {message}", pb_utils.TritonError.INTERNAL)
            return
        self.metrics["translations"].increment(1)
        self.metrics["unet_evaluations"].increment(result.unet_evaluations)
        self.metrics["source_cache_hits"].increment(int(result.source_cache_hit))
        start = 0
        for index, checked in members:
            share = share_of(result, slice(start, start + len(checked.prompts)))
            start += len(checked.prompts)
            tensors = [pb_utils.Tensor(name, array) for name, array in response_arrays(share).items()]
            responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        del self.translator  # its sessions and memory go with the instance


def _arrays(request: Any) -> dict[str, Any]:
    found = {io.name: pb_utils.get_input_tensor_by_name(request, io.name) for io in INPUTS}
    return {name: tensor.as_numpy() for name, tensor in found.items() if tensor is not None}


def _error(message: str, code: Any) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def _metrics(model: str) -> tuple[list[Any], dict[str, Any]]:
    """Counters beside Triton's own nv_inference_* ones on its metrics endpoint: their families (which must be
    kept alive longer than the metrics) and the metrics by name."""
    described = {"translations": "translations run (a shared one counts once)",
                 "unet_evaluations": "UNet sample evaluations", "source_cache_hits": "translations whose source "
                 "(inversion and captured features) came from the cache"}
    families = {name: pb_utils.MetricFamily(name=f"pnp_trt_{name}_total", description=text,
                                            kind=pb_utils.MetricFamily.COUNTER) for name, text in described.items()}
    return list(families.values()), {name: family.Metric(labels={"model": model}) for name, family in families.items()}
