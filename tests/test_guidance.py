"""Guidance images reach the sampler the same way from a file or a PIL image: upright (EXIF), RGB, checked."""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pnp_trt import TranslateConfig, Translator
from pnp_trt.errors import PnPError
from pnp_trt.images import load_guidance, normalize_guidance

SETTINGS = {"steps": 2, "height": 64, "width": 128}


def _sideways_photo(path: Path) -> Path:
    """A 128×64 picture, red on its left half, stored as a phone does: pixels 64×128 and EXIF orientation 6
    (rotate 90° clockwise to display)."""
    upright = np.zeros((64, 128, 3), np.uint8)
    upright[:, :64, 0] = 255
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif)
    return path


def test_exif_orientation_is_applied_for_files_and_pil_images(tmp_path: Path) -> None:
    path = _sideways_photo(tmp_path / "phone.jpg")
    for image in (load_guidance(path), normalize_guidance(Image.open(path))):
        pixels = np.asarray(image)
        assert image.size == (128, 64)
        assert pixels[:, :64, 0].mean() > 200 and pixels[:, 64:, 0].mean() < 50


@pytest.mark.parametrize("mode", ["RGBA", "CMYK", "L", "I;16", "P"])
def test_pil_images_of_any_mode_translate(tiny_torch, mode: str) -> None:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 128, 3), np.uint8)).convert(mode)
    result = Translator(tiny_torch).translate(["a cat"], image, **SETTINGS)
    assert [im.size for im in result.images] == [(128, 64)]


@pytest.mark.parametrize("size", [(1, 1), (0, 0), (63, 200)])
def test_too_small_pil_images_are_refused(tiny_torch, size: tuple[int, int]) -> None:
    with pytest.raises(PnPError, match="both sides must be at least 64 px"):
        Translator(tiny_torch).translate(["a cat"], Image.new("RGB", size), **SETTINGS)


def test_a_single_string_is_one_prompt(tiny_torch) -> None:
    image = Image.new("RGB", (128, 64), (40, 90, 200))
    assert len(Translator(tiny_torch).translate("a cat", image, **SETTINGS).images) == 1


@pytest.mark.parametrize("setting", ["guidance_scale", "source_guidance_scale"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scales_are_refused(setting: str, value: float) -> None:
    with pytest.raises(PnPError, match="must be a finite number"):
        TranslateConfig(**{setting: value})


def test_paths_may_be_strings(tiny_model_dir: Path, tmp_path: Path) -> None:
    translator = Translator.open("torch", model=str(tiny_model_dir), cache_dir=str(tmp_path / "cache"))
    translator.translate(["a cat"], Image.new("RGB", (128, 64), (40, 90, 200)), **SETTINGS)
    assert list((tmp_path / "cache").glob("*.safetensors"))


def test_16_bit_images_convert_exactly_without_float64_copies() -> None:
    """16-bit greyscale maps 0..65535 onto 0..255 (rounded); the conversion's peak allocation stays near the
    image's own size (tracemalloc counts numpy's buffers): 36 MiB for 16 MiB of pixels, where float64 took 192."""
    import tracemalloc

    values = np.array([[0, 257, 32768, 65535] * 16] * 64, dtype=np.uint16)
    converted = normalize_guidance(Image.fromarray(values))
    assert np.asarray(converted)[0, :4, 0].tolist() == [0, 1, 128, 255]
    big = Image.fromarray(np.full((2048, 4096), 40000, np.uint16))  # 16 MiB of pixels
    tracemalloc.start()
    try:
        normalize_guidance(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * 16 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_outputs_over_the_pixel_limit_are_refused(tiny_torch, exported: Path, tmp_path: Path) -> None:
    """The output size is bounded (memory grows with it): the API and the CLI refuse before any UNet call."""
    from typer.testing import CliRunner

    from pnp_trt.cli import app
    from pnp_trt.config import Limits

    image = Image.fromarray(np.zeros((64, 128, 3), np.uint8))
    with pytest.raises(PnPError, match=r"output 64x128 is 0.00819 Mpx, over the 0.0041 Mpx limit"):
        Translator(tiny_torch, limits=Limits(max_output_pixels=64 * 64)).translate("a cat", image, **SETTINGS)
    result = CliRunner().invoke(app, ["translate", "--source-prompt", "a cat", "-p", "a dog", "--height", "2048",
                                      "--width", "2048", "--out", str(tmp_path / "x.png"), "--backend",
                                      "onnxruntime", "--engines", str(exported)])
    assert result.exit_code == 2 and "is 4.19 Mpx, over the 1.05 Mpx limit" in result.output
    assert list(tmp_path.iterdir()) == []


def _tiff(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values).save(path, format="TIFF")
    return path


def _animated(path: Path, fmt: str) -> Path:
    frames = [Image.new("RGB", (64, 64), c) for c in ((200, 0, 0), (0, 200, 0))]
    frames[0].save(path, format=fmt, save_all=True, append_images=frames[1:])
    return path


@pytest.mark.parametrize("case,make,fragment", [
    ("32-bit int TIFF", lambda p: _tiff(p / "i.tif", np.full((64, 64), 3, np.int32)), "32-bit integer image"),
    ("NaN float TIFF", lambda p: _tiff(p / "f.tif", np.full((64, 64), np.nan, np.float32)), "32-bit float image"),
    ("animated GIF", lambda p: _animated(p / "a.gif", "GIF"), "has 2 frames"),
    ("animated WebP", lambda p: _animated(p / "a.webp", "WEBP"), "has 2 frames"),
    ("APNG", lambda p: _animated(p / "a.png", "PNG"), "has 2 frames"),
    ("multi-page TIFF", lambda p: _animated(p / "m.tif", "TIFF"), "has 2 frames"),
])
def test_guidance_pixels_without_one_meaning_are_refused(tmp_path: Path, case: str, make, fragment: str) -> None:
    """No guess stands in for the user's picture: no brightness range (a near-black 32-bit image was stretched to
    white, a NaN one went black) or several frames (frame 0 was taken silently) is one line."""
    with pytest.raises(PnPError, match=fragment):
        load_guidance(make(tmp_path))


def test_damaged_exif_is_ignored_with_a_warning(tmp_path: Path, monkeypatch) -> None:
    """Pillow's EXIF parser raising on a damaged block (struct.error was seen; Pillow 13 tolerates the blocks we
    could craft, so its failure is raised here) costs the orientation tag, with a warning, not the run."""
    import struct

    from PIL import ImageOps

    def damaged(image):
        raise struct.error("unpack requires a buffer of 12 bytes")

    path = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 64), (10, 20, 30)).save(path)
    monkeypatch.setattr(ImageOps, "exif_transpose", damaged)
    with pytest.warns(RuntimeWarning, match="damaged EXIF"):
        image = load_guidance(path)
    assert image.size == (64, 64) and image.mode == "RGB"


def test_every_reasonable_guidance_form_gives_the_same_image(tmp_path: Path) -> None:
    """A path (str or Path), a PIL image, the file's bytes, an H×W×3 uint8 array: one picture."""
    from pnp_trt.images import check_guidance

    pixels = np.random.default_rng(0).integers(0, 255, (64, 96, 3), np.uint8)
    path = tmp_path / "g.png"
    Image.fromarray(pixels).save(path)
    for form in (path, str(path), Image.open(path), path.read_bytes(), pixels):
        assert np.array_equal(np.asarray(check_guidance(form).image), pixels), type(form)


@pytest.mark.parametrize("value,fragment", [
    (np.zeros((3, 64, 64), np.float32), "got an array of float32 (3, 64, 64)"),
    (b"not an image", "cannot read the image bytes as an image (not a PNG, JPEG or WebP file, or empty)"),
    (b"", "cannot read the image bytes as an image (not a PNG, JPEG or WebP file, or empty)"),  # corpus 14 A57
    (b"/", "the image bytes are a file's path, and bytes are read as an image file's contents"),  # corpus 14 A59
    (12, "got int"),
    (np.broadcast_to(np.zeros(3, np.uint8), (1, 10**8, 3)), "is 100000000×1; both sides must be at least 64"),  # r7
])
def test_other_guidance_forms_are_one_line(value, fragment: str) -> None:
    from pnp_trt.images import check_guidance

    with pytest.raises(PnPError, match=re.escape(fragment)):
        check_guidance(value)


@pytest.mark.parametrize("settings,fragment", [
    ({"steps": "2"}, "steps must be a whole number, got '2' (str)"),
    ({"steps": 2.5}, "steps must be a whole number, got 2.5 (float)"),
    ({"steps": True}, "steps must be a whole number"),
    ({"feature_injection": "0.5"}, "feature_injection must be a number"),
    ({"guidance_scale": 1e308}, "guidance_scale must be between -1000 and 1000"),
    ({"negative_prompt": None}, "negative_prompt must be text"),
    ({"seed": 2**70}, "seed must be between 0 and"),
    ({"stepz": 3}, "unknown setting(s) 'stepz'"),
])
def test_api_settings_are_typed_and_bounded(tiny_torch, settings: dict, fragment: str) -> None:
    with pytest.raises(PnPError) as error:
        Translator(tiny_torch).translate(["a cat"], Image.new("RGB", (128, 64)), **settings)
    assert fragment in str(error.value) and "--" not in str(error.value)  # corpus 12: keywords, not CLI flags


@pytest.mark.parametrize("prompts,fragment", [
    ([], "give at least one target prompt"), (None, "give at least one target prompt"),
    ([1, 2], "prompt 1 must be text, got 1 (int)"), (["a cat", "  "], "prompt 2 must not be empty"),
    (["\udcff"], "prompt 1 is not valid UTF-8"),
    (["\u200b"], "prompt 1 must not be empty or only spaces, control or invisible"),  # corpus round 5
    (["\x07\x1b"], "prompt 1 must not be empty or only spaces, control or invisible"),
    (["a c\x00at"], "prompt 1 contains a NUL character"),
    (["word " * 401], "prompt 1 is 2005 characters, over the limit of 2000"),  # corpus 11: the server's rule
    *[([blank], "prompt 1 must not be empty or only spaces, control or invisible")  # corpus round 6
      for blank in ("\ufe0f", "\u3164", "\u2800", " \u115f\u1160 ", "\u0301\u0301")],
])
def test_prompts_follow_one_rule_everywhere(tiny_torch, prompts, fragment: str) -> None:
    with pytest.raises(PnPError, match=re.escape(fragment)):
        Translator(tiny_torch).translate(prompts, Image.new("RGB", (128, 64)), **SETTINGS)


def test_a_model_path_may_be_a_path(tiny_model_dir: Path) -> None:
    assert Translator.open("torch", model=tiny_model_dir).model.dims.latent_channels == 4


def _png(image: Image.Image | None = None, **save) -> bytes:
    import io

    buffer = io.BytesIO()
    (image or Image.new("RGB", (64, 64), "red")).save(buffer, "PNG", **save)
    return buffer.getvalue()


def _rebuilt(data: bytes, change) -> bytes:
    """A PNG's chunks passed through `change` (a list of whole chunks in, a list out), joined again."""
    from pnp_trt.png_chunks import SIGNATURE, chunks

    return SIGNATURE + b"".join(change([c for _, c in chunks(data)]))


def _chunk(kind: bytes, body: bytes) -> bytes:
    import zlib

    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def _with_idat(chunks: list[bytes], change) -> list[bytes]:
    """The image data joined into one IDAT chunk, its bytes passed through `change`."""
    data = b"".join(c[8:-4] for c in chunks if c[4:8] == b"IDAT")
    first = next(i for i, c in enumerate(chunks) if c[4:8] == b"IDAT")
    rest = [c for c in chunks if c[4:8] != b"IDAT"]
    return [*rest[:first], _chunk(b"IDAT", change(data)), *rest[first:]]


def _palette_png_without_plte() -> bytes:
    image = Image.new("P", (64, 64))
    image.putpalette([i % 256 for i in range(768)])
    return _rebuilt(_png(image), lambda cs: [c for c in cs if c[4:8] != b"PLTE"])


def _cut_image_data(chunks: list[bytes]) -> list[bytes]:
    """The IDAT chunk re-written (valid checksum) holding half its compressed bytes."""
    idat = next(c for c in chunks if c[4:8] == b"IDAT")
    return [_chunk(b"IDAT", idat[8:-4][:len(idat) // 2]) if c is idat else c for c in chunks]


DAMAGED_PNGS = {  # corpus rounds 7 and 8: Pillow decoded each (missing rows black) and pnp-trt translated it
    "bad IDAT checksum": (lambda cs: [c[:-4] + bytes(4) if c[4:8] == b"IDAT" else c for c in cs], "fails its checksum"),
    "two IHDR": (lambda cs: [cs[0], *cs], "its header (IHDR) is not its one first chunk"),
    "unknown critical chunk": (lambda cs: [cs[0], _chunk(b"ZZZZ", b"x"), *cs[1:]], "unknown critical chunk 'ZZZZ'"),
    "image data cut short": (_cut_image_data, "its image data is cut short"),
    "no IEND": (lambda cs: cs[:-1], "does not end with an empty IEND"),
    # corpus round 9
    "IEND with data": (lambda cs: [*cs[:-1], _chunk(b"IEND", b"x")], "does not end with an empty IEND"),
    "compression method 1": (lambda cs: [_chunk(b"IHDR", cs[0][8:18] + b"\x01" + cs[0][19:21]), *cs[1:]],
                             "not the PNG standard's"),
    "junk after the image stream": (lambda cs: _with_idat(cs, lambda data: data + b"junk"), "followed by other bytes"),
    "more image data than pixels": (lambda cs: _with_idat(cs, lambda data: zlib.compress(
        zlib.decompress(data) + bytes(64 * 4))), "holds 12608 bytes where its pixels take 12352"),
    "palette after the image data": (lambda cs: [*cs[:-1], _chunk(b"PLTE", bytes(3)), cs[-1]], "palette (PLTE)"),
    "a 4-byte palette": (lambda cs: [cs[0], _chunk(b"PLTE", bytes(4)), *cs[1:]], "palette (PLTE)"),
    "Apple CgBI": (lambda cs: [_chunk(b"CgBI", b"\x50\x00\x20\x02"), *cs], "an Apple CgBI PNG"),
}


@pytest.mark.parametrize("case", DAMAGED_PNGS)
def test_a_damaged_png_is_refused_before_pillow_decodes_it(case: str) -> None:
    from pnp_trt.images import check_guidance

    change, fragment = DAMAGED_PNGS[case]
    with pytest.raises(PnPError, match=re.escape(fragment)):
        check_guidance(_rebuilt(_png(), change))


def test_well_formed_pngs_pass_the_chunk_check() -> None:
    """Pillow's own PNGs, plain, palette, and with bytes after IEND (some tools append them), decode; an APNG's
    extra chunks are ancillary, well-formed (it is refused as animated, not as damaged)."""
    from pnp_trt.images import check_guidance
    from pnp_trt.png_chunks import damage

    for data in (_png(), _png(Image.new("P", (64, 64))), _png() + b"trailing"):
        assert check_guidance(data).image.size == (64, 64)
    for mode in ("1", "LA", "I;16", "RGBA"):
        assert damage(_png(Image.new(mode, (61, 37)))) is None, mode
    frames = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]
    animated = _png(frames[0], save_all=True, append_images=frames[1:])
    assert damage(animated) is None
    one_frame = _rebuilt(animated, lambda cs: [_chunk(b"acTL", (1).to_bytes(4, "big") + c[12:16])
                                              if c[4:8] == b"acTL" else c for c in cs])
    assert damage(one_frame) == "its animation declares 1 frame(s) and holds 2"  # corpus round 9


def test_corpus_round_6_guidance_forms(tmp_path: Path) -> None:
    """Premultiplied-alpha PIL images (La, RGBa) convert instead of raising from Pillow; a palette PNG without
    its palette (Pillow reads it as grey) is refused as damaged."""
    from pnp_trt.images import check_guidance

    for mode in ("La", "RGBa"):
        assert check_guidance(Image.new(mode, (64, 64))).image.mode == "RGB"
    with pytest.raises(PnPError, match="a palette image without its palette"):
        check_guidance(_palette_png_without_plte())


def test_corpus_round_6_api_types(tiny_torch, tmp_path: Path) -> None:
    """The one-call API names a wrong model or config; a seed given with an image is refused as on the CLI and
    HTTP; an empty cache directory, a non-bool overwrite are one line; an os.PathLike path is a path."""
    import os

    from pnp_trt import SourceCache, translate

    image = Image.new("RGB", (128, 64))
    with pytest.raises(PnPError, match="model must be a loaded model"):
        translate("stabilityai/stable-diffusion-2-1-base", ["a cat"], image=image)
    with pytest.raises(PnPError, match="config must be a pnp_trt.TranslateConfig"):
        translate(tiny_torch, ["a cat"], {"steps": 2}, image=image)
    for setting in ("seed", "source_guidance_scale"):
        with pytest.raises(PnPError, match=f"{setting} applies with a source prompt"):
            Translator(tiny_torch).translate(["a cat"], image, **SETTINGS, **{setting: 3})
    with pytest.raises(PnPError, match="cache_dir is empty"):
        SourceCache(directory="")
    with pytest.raises(PnPError, match="cache must be a pnp_trt.SourceCache"):  # round 7
        translate(tiny_torch, ["a cat"], image=image, cache="/tmp/x")
    with pytest.raises(PnPError, match="limits must be a pnp_trt.config.Limits"):
        translate(tiny_torch, ["a cat"], image=image, limits=100)
    with pytest.raises(PnPError, match="unknown setting\\(s\\) 'stepz'; the settings are steps, "):  # corpus 14 A113
        translate(tiny_torch, ["a cat"], image=image, stepz=2)
    with pytest.raises(PnPError, match="as config or as keywords \\(steps=...\\), not both"):
        translate(tiny_torch, ["a cat"], TranslateConfig(), image=image, steps=2)
    keywords = translate(tiny_torch, ["a cat"], image=image, **SETTINGS)
    assert keywords.settings == TranslateConfig(**SETTINGS)

    class Where(os.PathLike):
        def __fspath__(self) -> str:
            return str(tmp_path / "r.png")

    result = Translator(tiny_torch).translate(["a cat"], image, **SETTINGS)
    with pytest.raises(PnPError, match="overwrite must be true or false"):
        result.save_image(tmp_path / "r.png", overwrite="no")
    assert result.save_image(Where()) == tmp_path / "r.png" and (tmp_path / "r.png").is_file()
    (tmp_path / "r.png").unlink()
    image.save(tmp_path / "r.png")
    assert Translator(tiny_torch).translate(["a cat"], Where(), **SETTINGS).guidance_file == str(tmp_path / "r.png")


def test_every_text_setting_has_the_servers_length_limit(tiny_torch) -> None:
    """Corpus 11: a 100,000-character negative prompt was used silently by the CLI and API (77 tokens read)
    where the server refused it: one limit, in the one validation layer."""
    with pytest.raises(PnPError, match="^negative_prompt is 2001 characters, over the limit of 2000"):
        Translator(tiny_torch).translate("a cat", Image.new("RGB", (128, 64)), negative_prompt="x" * 2001,
                                         **SETTINGS)


def test_an_exif_orientation_that_means_nothing_is_ignored_with_a_warning(tmp_path: Path) -> None:
    """Corpus 12: Orientation 99 (1 to 8 mean something) was ignored in silence."""
    from pnp_trt.images import ORIENTATION_TAG

    path, exif = tmp_path / "photo.jpg", Image.Exif()
    exif[ORIENTATION_TAG] = 99
    Image.new("RGB", (64, 128), (10, 20, 30)).save(path, exif=exif)
    with pytest.warns(RuntimeWarning, match="EXIF orientation of 99, which means nothing"):
        image = load_guidance(path)
    assert image.size == (64, 128)


def test_a_header_past_pillows_limit_is_refused_with_its_own_size(tmp_path: Path) -> None:
    """Corpus 12: a 100000 × 100000 header was refused as "more than 179 Mpx" (Pillow's threshold, not its size)."""
    import struct
    import zlib

    path = tmp_path / "huge.png"
    Image.new("RGB", (64, 64)).save(path)
    data = bytearray(path.read_bytes())
    data[16:29] = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(data[16:29])))
    path.write_bytes(bytes(data))
    with pytest.raises(PnPError, match=r"is 10000 Mpx \(its header says so\); the limit is 50 Mpx"):
        load_guidance(path)


def test_saving_refusals_name_the_api_arguments(tiny_torch, tmp_path: Path) -> None:
    """Corpus 12: save_image onto a user's file said "--out … pass --overwrite"; a caller passes a path and
    overwrite=True."""
    result = Translator(tiny_torch).translate(["a cat"], Image.new("RGB", (128, 64)), **SETTINGS)
    (tmp_path / "mine.png").write_bytes(b"a user's")
    with pytest.raises(PnPError, match=r"^save_image's path .*mine.png exists and was not written by pnp-trt; "
                                       r"choose another name, or pass overwrite=True to replace it$"):
        result.save_image(tmp_path / "mine.png")
    (tmp_path / "file").write_bytes(b"a user's")
    with pytest.raises(PnPError, match=r"^save's directory .*file is a file; with several prompts it must be a"):
        result.save(tmp_path / "file")
    assert (tmp_path / "mine.png").read_bytes() == (tmp_path / "file").read_bytes() == b"a user's"


def test_corpus_14_api_refusals(tiny_torch, tmp_path: Path) -> None:
    """Corpus 14: save_image("o.png/") wrote o.png (the CLI refuses a final /); decode_guidance with an image was
    ignored (the CLI refuses --save-guidance with one)."""
    translator = Translator(tiny_torch)
    result = translator.translate(["a cat"], Image.new("RGB", (128, 64)), **SETTINGS)
    with pytest.raises(PnPError, match=r"^save_image's path .*o.png/ ends in /, naming a directory"):
        result.save_image(f"{tmp_path}/o.png/")
    assert not (tmp_path / "o.png").exists()
    with pytest.raises(PnPError, match="^decode_guidance decodes a guidance generated from a source prompt"):
        translator.translate(["a cat"], Image.new("RGB", (128, 64)), decode_guidance=True, **SETTINGS)


def test_translator_open_refusals_name_its_keywords(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Corpus 13: Translator.open's refusals said --model, --engines, --injection-preset; a caller passes keywords
    (a command to run, in backquotes, keeps its flags)."""
    with pytest.raises(PnPError, match="^engines is for the onnxruntime and tensorrt backends; the torch backend "
                                       "runs model "):
        Translator.open("torch", engines=tmp_path)
    with pytest.raises(PnPError, match="^cache_dir_bytes is the budget of cache_dir, and no cache_dir is given"):
        Translator.open("torch", model=tiny_model_dir, cache_dir_bytes=10)
    with pytest.raises(PnPError, match=r"^injection_preset 'zzz' is not one of"):
        Translator.open("torch", model=tiny_model_dir, injection_preset="zzz")
    with pytest.raises(PnPError, match=r"does not exist; pass the directory `pnp-trt export` wrote "
                                       r"\(`pnp-trt export --model MODEL"):
        Translator.open("onnxruntime", engines=tmp_path / "nowhere")


def test_the_api_output_limit_names_the_api(tiny_torch) -> None:
    with pytest.raises(PnPError, match=r"pass a smaller height/width \(or a larger Limits\(max_output_pixels=...\)"):
        Translator(tiny_torch).translate("a cat", Image.new("RGB", (64, 64)), **{**SETTINGS, "height": 2048,
                                                                                 "width": 2048})
