"""Scale-out on Ray Serve: a gateway deployment runs the same FastAPI app (`app.py`: validation, limits,
coalescing, metrics, JSON errors) and sends each translation to a model deployment, one model per replica
(one GPU each where the cluster has GPUs). Ray restarts a replica that dies; a request that was on it gets
a JSON 503 from the gateway.

Source affinity: each translation is routed with its guidance's key as Serve's multiplexed model id, so
requests on the same guidance go to the replica that already holds its captured source (where Serve's
router can; otherwise another replica captures it once, or reads it from a shared `cache_dir`).

    pnp-trt serve --engines DIR --ray --replicas 2                      # a local Ray, started for it
    serve run pnp_trt.serve.ray_app:application engines=DIR replicas=4   # on a running cluster (RAY_ADDRESS)

A Serve config file names `import_path: pnp_trt.serve.ray_app:application` and the same keys as `args`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from PIL import Image
from ray import serve
from ray.exceptions import RayError, RayTaskError

from ..config import TranslateConfig
from ..contract import ModelDims
from ..errors import PnPError
from ..images import Guidance, png_bytes
from ..runtime.sampler import Stats, no_progress
from ..runtime.translation import Translation
from .app import SERVED_BY, create_app
from .batching import DeadlineCheck, DeadlineExceeded, group_key
from .limits import RequestError, ServeOptions


class ModelReplica:
    """One replica of the model deployment: a `Translator` and the sources it has captured."""

    def __init__(self, options: ServeOptions):
        self.translator = options.load()

    def describe(self) -> dict[str, Any]:
        model = self.translator.model
        return {"backend": model.backend.name, "identity": model.identity, "dims": dataclasses.asdict(model.dims)}

    @serve.multiplexed(max_num_models_per_replica=256)
    async def hold_source(self, key: str) -> str:
        """Registers `key` as held here, so Serve routes later requests on that guidance to this replica."""
        return key

    async def translate(self, prompts: list[str], png: bytes, source_prompt: str | None,
                        settings: dict[str, Any], seconds_left: float | None = None) -> dict[str, Any]:
        """One translation; with `seconds_left` (the gateway's deadline) it stops at its next step once nobody
        waits for it, instead of keeping this replica busy."""
        await self.hold_source(serve.get_multiplexed_model_id())
        image = Image.open(io.BytesIO(png)) if png else None
        progress = DeadlineCheck.within(seconds_left) if seconds_left is not None else no_progress
        result = await asyncio.to_thread(self.translator.translate, prompts, image, source_prompt, progress,
                                         **settings)
        return {"images": [png_bytes(image) for image in result.images], "latents": result.latents,
                "timings_s": result.timings_s,
                "unet_evaluations": result.unet_evaluations, "unet_calls": result.unet_calls,
                "source_cache_hit": result.source_cache_hit, "size": result.size, "served_by": SERVED_BY}


@dataclasses.dataclass(frozen=True)
class RemoteTranslation(Translation):
    served_by: str = SERVED_BY
    """The model replica that ran it."""


class RemoteTranslator:
    """What the server needs of a `Translator` (`model`, `translate`), over the model deployment."""

    def __init__(self, handle: Any):
        self.handle = handle
        info = handle.describe.remote().result()
        self.model = SimpleNamespace(backend=SimpleNamespace(name=info["backend"]), identity=info["identity"],
                                     dims=ModelDims.from_dict(info["dims"]))

    def translate(self, prompts: list[str], image: Guidance | None, source_prompt: str | None,
                  progress: Callable[..., Any] | None = None, **settings: Any) -> Translation:
        png = png_bytes(image.image) if image is not None else b""
        key = group_key(png, source_prompt, settings)
        seconds_left = progress.seconds_left() if isinstance(progress, DeadlineCheck) else None
        try:
            answer = self.handle.options(multiplexed_model_id=key).translate.remote(
                prompts, png, source_prompt, settings, seconds_left).result()
        except RayTaskError as exc:  # raised in the replica: a user error stays one (its own line, no trace)
            if isinstance(exc.cause, PnPError):
                raise PnPError(str(exc.cause)) from None
            if isinstance(exc.cause, DeadlineExceeded):
                raise DeadlineExceeded(str(exc.cause)) from None
            raise
        except RayError:  # the replica died or is unreachable (killed, node lost): not the client's
            raise RequestError(503, "the model replica running this request stopped (Ray restarts it); "
                                    "retry") from None
        stats = Stats(answer["timings_s"], answer["unet_evaluations"], answer["unet_calls"])
        return RemoteTranslation([Image.open(io.BytesIO(b)) for b in answer["images"]],
                                 answer["latents"], stats, tuple(answer["size"]),
                                 answer["source_cache_hit"], list(prompts), TranslateConfig(**settings),
                                 self.model.backend.name, self.model.identity, source_prompt,
                                 served_by=answer["served_by"])


@serve.ingress()
class Gateway:
    """The HTTP side: the FastAPI app, built on its replica, translating through the model deployment."""

    def __init__(self, options: ServeOptions, model: Any):
        self.options, self.model = options, model

    def __serve_build_asgi_app__(self) -> Any:
        return create_app(lambda: RemoteTranslator(self.model), self.options.limits(), self.options.coalesce_ms,
                          self.options.workers * self.options.replicas)


def build_application(options: ServeOptions) -> Any:
    """The Serve application: one gateway, `options.replicas` model replicas."""
    model: Any = serve.deployment(ModelReplica, name="pnp-model", num_replicas=options.replicas,
                                  max_ongoing_requests=options.queue,
                                  ray_actor_options={"num_gpus": options.gpus_per_replica})
    gateway: Any = serve.deployment(Gateway, name="pnp-gateway", num_replicas=1,  # light: reserves no CPU
                                    max_ongoing_requests=max(options.queue, 64), ray_actor_options={"num_cpus": 0})
    return gateway.bind(options, model.bind(options))


def application(args: dict[str, str]) -> Any:
    """Entry point for `serve run pnp_trt.serve.ray_app:application key=value ...` and Serve config files."""
    return build_application(ServeOptions.parse(args))
