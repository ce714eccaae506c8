"""A PNG file's chunks, read and written as bytes: the one walker of PNG structure (a result's sealed record, a
guidance's well-formedness)."""

from __future__ import annotations

import zlib
from collections.abc import Iterable

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    """A PNG's chunks as (type, whole chunk bytes), the last one cut short if `data` is (a file's head); bytes
    after IEND count as a chunk of type b''."""
    found, at = [], len(SIGNATURE)
    while at + 8 <= len(data):
        length = int.from_bytes(data[at:at + 4], "big")
        kind, end = data[at + 4:at + 8], at + 12 + length
        found.append((kind, data[at:end]))
        at = end
        if kind == b"IEND":
            break
    if at < len(data):
        found.append((b"", data[at:]))
    return found


def text_chunk(keyword: str, text: str) -> bytes:
    """A tEXt chunk (Latin-1 keyword and text) with its CRC."""
    data = keyword.encode("latin-1") + b"\0" + text.encode("latin-1")
    return len(data).to_bytes(4, "big") + b"tEXt" + data + zlib.crc32(b"tEXt" + data).to_bytes(4, "big")


CRITICAL = (b"IHDR", b"PLTE", b"IDAT", b"IEND")
"""The critical chunks of the PNG standard; a decoder must refuse any other critical (upper-case) chunk."""


def damage(data: bytes) -> str | None:
    """What makes `data` not a well-formed PNG that Pillow might still decode (None when nothing): the header
    not first or not alone, a chunk cut short or failing its checksum, an unknown critical chunk, no IEND, or
    image data that ends before its compressed stream does (Pillow paints the missing rows black)."""
    found = [(kind, chunk) for kind, chunk in chunks(data) if kind]
    kinds = [kind for kind, _ in found]
    if not kinds or kinds[0] != b"IHDR" or kinds.count(b"IHDR") != 1:
        return "its header (IHDR) is not its one first chunk"
    for kind, chunk in found:
        if len(chunk) < 12 or len(chunk) != 12 + int.from_bytes(chunk[:4], "big"):
            return f"its {kind.decode('latin-1')} chunk is cut short"
        if zlib.crc32(chunk[4:-4]) != int.from_bytes(chunk[-4:], "big"):
            return f"its {kind.decode('latin-1')} chunk fails its checksum"
        if kind[:1].isupper() and kind not in CRITICAL:
            return f"it has an unknown critical chunk {kind.decode('latin-1')!r}"
    if kinds[-1] != b"IEND":
        return "it does not end with IEND"
    return None if _stream_complete(c[8:-4] for k, c in found if k == b"IDAT") else "its image data is cut short"


def _stream_complete(parts: Iterable[bytes]) -> bool:
    """Whether the image data's zlib stream reaches its end (decompressed in bounded pieces, then dropped)."""
    stream = zlib.decompressobj()
    try:
        for part in parts:
            while part and not stream.eof:
                stream.decompress(part, 1 << 24)
                part = stream.unconsumed_tail
    except zlib.error:
        return False
    return stream.eof
