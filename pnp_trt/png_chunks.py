"""A PNG file's chunks, read and written as bytes: the one walker of PNG structure (a result's sealed record, a
guidance's well-formedness)."""

from __future__ import annotations

import zlib

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
    not first, not alone or not the standard's, a chunk cut short or failing its checksum, an unknown critical
    chunk, a palette out of place or of a wrong size, an IEND with data or none, image data other than the
    header's pixels need (Pillow paints missing rows black and ignores extra bytes), or frames other than an
    animation declares."""
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
    header = found[0][1][8:-4]
    if len(header) != 13 or header[10:12] != b"\0\0" or header[12] > 1:
        return "its header (IHDR) is not the PNG standard's (size, compression, filter or interlace method)"
    return _layout_damage(kinds, found) or _data_damage(header, [c[8:-4] for k, c in found if k == b"IDAT"])


def _layout_damage(kinds: list[bytes], found: list[tuple[bytes, bytes]]) -> str | None:
    if kinds[-1] != b"IEND" or len(found[-1][1]) != 12:
        return "it does not end with an empty IEND"
    if b"PLTE" in kinds:
        palette = next(c for k, c in found if k == b"PLTE")
        if kinds.count(b"PLTE") > 1 or b"IDAT" in kinds[:kinds.index(b"PLTE")] or (len(palette) - 12) % 3 \
                or not 3 <= len(palette) - 12 <= 768:
            return "its palette (PLTE) is repeated, after the image data, or not 1 to 256 colours"
    declared = next((int.from_bytes(c[8:12], "big") for k, c in found if k == b"acTL"), None)
    if declared is not None and declared != kinds.count(b"fcTL"):
        return f"its animation declares {declared} frame(s) and holds {kinds.count(b'fcTL')}"
    return None


CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
"""Samples per pixel of each PNG colour type (grey, RGB, palette, grey + alpha, RGBA)."""
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
"""Interlaced passes: (x start, y start, x step, y step)."""


def _data_damage(header: bytes, parts: list[bytes]) -> str | None:
    """The image data must be one complete zlib stream of exactly the bytes the header's pixels take."""
    width, height = int.from_bytes(header[:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour, interlaced = header[8], header[9], header[12]
    if colour not in CHANNELS:
        return "its header (IHDR) names no PNG colour type"
    passes = ADAM7 if interlaced else ((0, 0, 1, 1),)
    needed = 0
    for x0, y0, dx, dy in passes:
        columns, rows = max(0, -(-(width - x0) // dx)), max(0, -(-(height - y0) // dy))
        if columns and rows:
            needed += rows * (1 + -(-(columns * CHANNELS[colour] * depth) // 8))
    produced = _inflated_size(parts)
    if produced is None:
        return "its image data is cut short or followed by other bytes"
    return None if produced == needed else f"its image data holds {produced} bytes where its pixels take {needed}"


def _inflated_size(parts: list[bytes]) -> int | None:
    """Bytes the image data's zlib stream inflates to (in bounded pieces, dropped), None unless it is exactly one
    complete stream."""
    stream, size = zlib.decompressobj(), 0
    try:
        for part in parts:
            while part:
                if stream.eof:
                    return None  # bytes after the stream's end
                size += len(stream.decompress(part, 1 << 24))
                part = stream.unconsumed_tail
            if stream.unused_data:
                return None
    except zlib.error:
        return None
    return size if stream.eof else None
