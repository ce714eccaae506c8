"""The HTTP server: `POST /v1/translate` (multipart: an image or a source prompt, one or more prompts, any
`TranslateConfig` setting), `GET /healthz`, `GET /metrics` (Prometheus), `GET /` (a page to try it), OpenAPI
at `/docs`. Every error is JSON `{"error": "<one line>"}`; a bad request never disturbs the others."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive

from ..errors import PnPError
from ..images import Guidance, png_bytes
from ..runtime.translation import Translation
from .batching import Coalescer, DeadlineExceeded, Group
from .forms import read_form, read_upload
from .limits import RequestError, ServeLimits, client_words
from .metrics import ServerMetrics
from .requests import CheckedRequest, check_request, share_of

SERVED_BY = f"{socket.gethostname()}:{os.getpid()}"
UNCOUNTED = {"/metrics", "/healthz", "/", "/docs", "/docs/oauth2-redirect", "/openapi.json"}
"""Monitoring and page routes: not counted among the answered requests."""
PAGE = Path(__file__).with_name("page.html")


class Translates(Protocol):
    """What the server needs of a translator: a `Translator` here, or the Ray gateway's remote one."""

    model: Any

    def translate(self, prompts: list[str], image: Guidance | None, source_prompt: str | None,
                  progress: Callable[[str, int], Callable[[], None]], **settings: Any) -> Translation: ...


class Server:
    """The model (loaded in the background), the request queue's bookkeeping and the coalescer."""

    def __init__(self, load: Callable[[], Translates], limits: ServeLimits, coalesce_ms: float, workers: int):
        self.limits, self.metrics = limits, ServerMetrics()
        self.translator: Translates | None = None
        self.load_error: str | None = None
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pnp-translate")
        self.coalescer = Coalescer(self._run, self.executor, coalesce_ms / 1000)
        self.in_flight = 0
        self._loader = threading.Thread(target=self._load, args=(load,), daemon=True)

    def _load(self, load: Callable[[], Translates]) -> None:
        try:
            self.translator = load()
        except Exception as exc:  # reported by /healthz; the process stays up to say so
            self.load_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__

    def _run(self, group: Group, progress: Callable[[str, int], Callable[[], None]]) -> Translation:
        assert self.translator is not None
        result = self.translator.translate(group.prompts, group.image, group.source_prompt, progress=progress,
                                           **group.config.to_dict())
        self.metrics.record_translation(result)
        return result

    async def translate(self, fields: dict[str, str], prompts: list[str], upload: UploadFile | None,
                        receive: Receive | None = None) -> Translation:
        """Validate, queue (or refuse when full) and wait for this request's share of a translation, or until
        the client closes its connection (read from the request's ASGI `receive`): its share is given up."""
        if self.translator is None:
            raise RequestError(503, self.load_error or "the model is still loading; retry shortly")
        data = await read_upload(upload, self.limits) if upload is not None else None
        request = check_request(fields, prompts, data, self.translator.model, self.limits)
        if self.in_flight >= self.limits.queue_length:
            raise RequestError(429, f"the server is busy ({self.in_flight} requests queued); retry shortly")
        self.in_flight += 1
        self.metrics.queue_depth.set(self.in_flight)
        try:
            return await self._wait(request, receive)
        finally:
            self.in_flight -= 1
            self.metrics.queue_depth.set(self.in_flight)

    async def _wait(self, request: CheckedRequest, receive: Receive | None) -> Translation:
        deadline = time.monotonic() + self.limits.deadline_s
        share = asyncio.ensure_future(self.coalescer.submit(request.key, request.image, request.source_prompt,
                                                            request.config, request.prompts, deadline))
        watch = asyncio.ensure_future(client_left(receive)) if receive is not None else None
        try:
            done, _ = await asyncio.wait([share, *([watch] if watch else [])], timeout=self.limits.deadline_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (share, watch):
                if task is not None and not task.done():
                    task.cancel()  # a cancelled share stops its group's work once nobody else waits for it
        if share in done and not isinstance(share.exception(), DeadlineExceeded):
            result, part = share.result()
            return share_of(result, part)
        if watch is not None and watch in done:
            raise RequestError(499, "the client closed its connection before its result was ready")
        raise RequestError(504, f"no result within this server's {self.limits.deadline_s:g} s deadline; "
                                "try fewer steps or prompts")


async def client_left(receive: Receive) -> None:
    """Returns once the client has closed its connection (ASGI's http.disconnect, once its body is read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def wants_png(accept: str) -> bool:
    """Whether an Accept header asks for image/png (with q > 0, and not below application/json's q)."""
    weights = accept_weights(accept)
    png = weights.get("image/png", 0.0)
    return png > 0 and png >= weights.get("application/json", 0.0)


def accepts_json(accept: str) -> bool:
    """Whether the JSON answer is acceptable: no Accept header, or one that names it (or a wildcard) with q > 0."""
    weights = accept_weights(accept)
    return not accept.strip() or any(weights.get(kind, 0.0) > 0 for kind in ("application/json", "application/*",
                                                                             "*/*"))


def accept_weights(accept: str) -> dict[str, float]:
    """Media type → q of an Accept header (a malformed q counts as 0)."""
    weights: dict[str, float] = {}
    for item in accept.split(","):
        kind, *params = [part.strip() for part in item.split(";")]
        q = next((p[2:] for p in params if p.startswith("q=")), "1")
        try:
            weights[kind.lower()] = float(q)
        except ValueError:
            weights[kind.lower()] = 0.0
    return weights


def _png_base64(image: Image.Image) -> str:
    return base64.b64encode(png_bytes(image)).decode()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(load: Callable[[], Translates], limits: ServeLimits | None = None, coalesce_ms: float = 10.0,
               workers: int = 1) -> FastAPI:
    """The FastAPI application; `load` runs once in the background at start-up (`/healthz` is 503 until it
    has finished)."""
    server = Server(load, limits or ServeLimits(), coalesce_ms, workers)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        server._loader.start()
        yield
        server.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="pnp-trt", summary="Plug-and-Play diffusion image translation", lifespan=lifespan)
    app.state.server = server

    @app.middleware("http")
    async def count_answers(request: Request, call_next: Callable[[Request], Any]) -> Response:
        """Every answer outside the monitoring routes is counted by status and timed, errors included."""
        started = time.monotonic()
        try:
            response = await call_next(request)
        except Exception:
            server.metrics.answered(500, time.monotonic() - started)
            raise
        if request.url.path not in UNCOUNTED:
            server.metrics.answered(response.status_code, time.monotonic() - started)
        return response

    _add_error_handlers(app, server)
    _add_routes(app, server)
    return app


def _add_error_handlers(app: FastAPI, server: Server) -> None:
    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError) -> JSONResponse:
        retry = {"Retry-After": str(max(1, math.ceil(server.metrics.typical_latency())))} if exc.status == 429 \
            else None
        return _error(exc.status, str(exc), retry)

    @app.exception_handler(PnPError)
    async def invalid(request: Request, exc: PnPError) -> JSONResponse:
        return _error(422, client_words(exc))

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, f"{where or 'request'}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error ({type(exc).__name__}); the server goes on serving")


def _add_routes(app: FastAPI, server: Server) -> None:
    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        if server.translator is None:
            return JSONResponse({"status": "error" if server.load_error else "loading",
                                 "error": server.load_error}, status_code=503)
        model = server.translator.model
        return JSONResponse({"status": "ok", "backend": model.backend.name, "model": model.identity,
                             "served_by": SERVED_BY})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.exposition(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    @app.post("/v1/translate", responses={200: {"content": {"image/png": {}}}})
    async def translate(request: Request) -> Response:
        """multipart/form-data: `image` (file) or `source_prompt`; `prompt` (repeat for several); any
        TranslateConfig setting (steps, guidance_scale, feature_injection, ...) as a field."""
        fields, prompts, upload = await read_form(request, server.limits)
        accept = request.headers.get("accept", "")
        if len(prompts) > 1 and wants_png(accept) and not accepts_json(accept):
            if upload is not None:
                await upload.close()
            return _error(406, f"image/png holds one image and this request has {len(prompts)} prompts; accept "
                               "application/json (every image, base64), or send one prompt")
        try:
            result = await server.translate(fields, prompts, upload, request.receive)
        finally:
            if upload is not None:
                await upload.close()  # the spooled upload (Starlette closes only forms it parsed itself)
        if wants_png(request.headers.get("accept", "")) and len(result.images) == 1:
            return Response(png_bytes(result.images[0]), media_type="image/png")
        return JSONResponse({"images": [_png_base64(image) for image in result.images],
                             "unet_evaluations": result.unet_evaluations, "source_cache_hit": result.source_cache_hit,
                             "timings_s": result.timings_s, "size": list(result.size),
                             "served_by": getattr(result, "served_by", SERVED_BY)})  # Ray: the model replica
