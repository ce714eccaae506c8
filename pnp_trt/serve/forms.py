"""Reading a translation request's form: bounded while it arrives, strict about what it holds (UTF-8 text,
one image, each setting once, a complete body), every refusal a `RequestError` with one line."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_plus, unquote_to_bytes

from python_multipart.multipart import parse_options_header
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request

from .limits import RequestError, ServeLimits

FORM_SLACK_BYTES = 1 << 20
"""What a form may hold beyond its image: the text fields (64 at most, each bounded)."""
MAX_FIELDS = 64
MAX_FILES = 2
"""One image, and room for one more file part, so that a second one is named (`_fields`) instead of counted."""


class StrictMultiPartParser(MultiPartParser):
    """Starlette's multipart parser, refusing a text field that is not valid UTF-8 (Starlette would read it
    as Latin-1) and a body that ends before the closing boundary (Starlette keeps the parts it got)."""

    complete = False

    def on_part_end(self) -> None:
        part = self._current_part
        if part.file is None:
            try:
                bytes(part.data).decode("utf-8")
            except UnicodeDecodeError:
                raise MultiPartException(f"the {part.field_name} field is not UTF-8 text; send text fields "
                                         "as UTF-8") from None
        super().on_part_end()

    def on_end(self) -> None:
        self.complete = True

    async def parse(self) -> FormData:
        form = await super().parse()
        if not self.complete:
            await form.close()
            raise MultiPartException("the form ends before its closing boundary: the request body was cut "
                                     "short; send it whole")
        return form


class StrictFormParser(FormParser):
    """Starlette's URL-encoded form parser, refusing a value that is not valid UTF-8 (it would become U+FFFD)."""

    def on_field_end(self) -> None:
        try:
            unquote_to_bytes(bytes(self._field_value).replace(b"+", b" ")).decode("utf-8")
        except UnicodeDecodeError:
            name = unquote_plus(self._field_name.decode("latin-1"))
            raise MultiPartException(f"the {name} field is not UTF-8 text; send text fields as UTF-8") from None
        super().on_field_end()


FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def media_type(request: Request) -> str:
    """The request's media type, without its parameters, in lower case (media types are case-insensitive)."""
    return parse_options_header(request.headers.get("content-type", ""))[0].decode("latin-1").lower()


async def read_form(request: Request, limits: ServeLimits) -> tuple[dict[str, str], list[str], UploadFile | None]:
    """The form: settings as strings (each once), the prompts (repeatable), the image upload (if any)."""
    if media_type(request) not in FORM_TYPES:
        raise RequestError(415, "send multipart/form-data (e.g. curl -F image=@photo.jpg -F prompt=\"a lego model\")")
    limit = limits.max_upload_bytes + FORM_SLACK_BYTES
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # refused before a byte of the body is read
        raise RequestError(413, over_request_limit(limits))
    try:
        return _fields(await asyncio.wait_for(_parse(request, limit, limits), limits.deadline_s))
    except TimeoutError:  # a stalled or trickling body: answered, its connection freed
        raise RequestError(408, f"the request body did not arrive in full within this server's "
                                f"{limits.deadline_s:g} s deadline; send it whole") from None


async def _parse(request: Request, limit: int, limits: ServeLimits) -> FormData:
    stream = Request(request.scope, _bounded_receive(request.receive, limit, limits)).stream()
    part_size = limits.max_upload_bytes + 1
    parser: FormParser | MultiPartParser = (
        StrictMultiPartParser(request.headers, stream, max_files=MAX_FILES, max_fields=MAX_FIELDS,
                              max_part_size=part_size)
        if media_type(request) == "multipart/form-data" else
        StrictFormParser(request.headers, stream, max_fields=MAX_FIELDS, max_part_size=part_size))
    try:
        return await parser.parse()
    except RequestError:
        raise
    except ClientDisconnect:
        raise RequestError(499, "the client closed the connection before its request was complete") from None
    except MultiPartException as exc:  # the parser's own refusals: over a limit, malformed, not UTF-8
        text = exc.message.splitlines()[0][:160]
        if "too many files" in text.lower():
            raise RequestError(422, "the form has several file parts; send the image as the one file field "
                                    "(prompts and settings are text fields)") from None
        over = any(word in text.lower() for word in ("exceed", "too many", "too large"))
        raise RequestError(413 if over else 422, f"{'form over a limit' if over else 'malformed form'}: {text}") \
            from None


def _fields(form: FormData) -> tuple[dict[str, str], list[str], UploadFile | None]:
    fields: dict[str, str] = {}
    prompts: list[str] = []
    upload: UploadFile | None = None
    for name, value in form.multi_items():
        if isinstance(value, str):
            if name == "prompt":
                prompts.append(value)
            elif name in fields:
                raise RequestError(422, f"the {name} field is given more than once; give it once")
            else:
                fields[name] = value
        elif name == "image" and upload is None:
            upload = value
        elif name == "image":
            raise RequestError(422, "the image field is given more than once; send one image")
        else:
            raise RequestError(422, f"unexpected file field {name!r}; the guidance image goes in the image field")
    if "image" in fields:
        raise RequestError(415, "the image field must be a file upload (curl -F image=@photo.jpg)")
    return fields, prompts, upload


async def read_upload(upload: UploadFile, limits: ServeLimits) -> bytes:
    data = await upload.read(limits.max_upload_bytes + 1)
    if len(data) > limits.max_upload_bytes:
        raise RequestError(413, over_upload_limit(limits))
    return data


def over_upload_limit(limits: ServeLimits) -> str:
    return (f"the image is over this server's {limits.max_upload_bytes / 2**20:g} MiB upload limit; send a "
            "smaller file")


def over_request_limit(limits: ServeLimits) -> str:
    return (f"the request is over this server's limit (an image of up to {limits.max_upload_bytes / 2**20:g} MiB "
            f"plus {FORM_SLACK_BYTES / 2**20:g} MiB of text fields); send a smaller image or shorter text")


def _bounded_receive(receive: Callable[[], Any], limit: int, limits: ServeLimits) -> Callable[[], Any]:
    """`receive` that refuses the body as soon as it passes `limit` bytes (a chunked upload declares no
    length), so an oversized upload is never spooled to disk in full."""
    received = 0

    async def bounded() -> Any:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise RequestError(413, over_request_limit(limits))
        return message
    return bounded
