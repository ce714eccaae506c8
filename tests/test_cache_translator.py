"""Capture once, translate many: cache hits, byte-budget eviction, disk store, batching, threads."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import in_threads, psnr, random_image

from pnp_trt import SourceCache, TranslateConfig, Translator
from pnp_trt.errors import PnPError
from pnp_trt.images import load_guidance
from pnp_trt.runtime.cache import source_bytes
from pnp_trt.runtime.translation import translate

SETTINGS = {"steps": 4, "height": 64, "width": 128}


@pytest.fixture()
def guide(tmp_path: Path):
    return load_guidance(random_image(tmp_path / "g.png", 128, 64))


def test_second_prompt_hits_the_cache(tiny_torch, guide) -> None:
    translator = Translator(tiny_torch)
    first = translator.translate(["a photo of a cat"], guide, **SETTINGS)
    second = translator.translate(["a painting of a dog"], guide, **SETTINGS, guidance_scale=3.0,
                                  negative_prompt="dark")
    assert not first.source_cache_hit and second.source_cache_hit
    assert first.unet_evaluations == 4 + 3 + 2 * 4  # inversion + capture (int(4·0.8) = 3 steps) + injection
    assert second.unet_evaluations == 2 * 4  # no second inversion or capture
    assert "invert" not in second.timings_s and "capture" not in second.timings_s
    uncached = translate(tiny_torch, ["a painting of a dog"], TranslateConfig(**SETTINGS, guidance_scale=3.0,
                                                                              negative_prompt="dark"), image=guide)
    assert np.array_equal(np.asarray(second.images[0]), np.asarray(uncached.images[0]))


def test_settings_the_source_depends_on_miss_the_cache(tiny_torch, guide) -> None:
    translator = Translator(tiny_torch)
    translator.translate(["a cat"], guide, **SETTINGS)
    assert not translator.translate(["a cat"], guide, **{**SETTINGS, "attention_injection": 0.25}).source_cache_hit
    assert not translator.translate(["a cat"], guide, **{**SETTINGS, "steps": 5}).source_cache_hit
    assert not translator.translate(["a cat"], guide.rotate(180), **SETTINGS).source_cache_hit
    assert translator.translate(["a dog"], source_prompt="a castle", **SETTINGS).source_cache_hit is False
    assert translator.translate(["a cat"], source_prompt="a castle", **SETTINGS).source_cache_hit
    assert not translator.translate(["a cat"], source_prompt="a castle", **{**SETTINGS, "seed": 1}).source_cache_hit


def test_only_injecting_steps_keep_features(tiny_torch, guide) -> None:
    cache = SourceCache()
    translate(tiny_torch, ["a"], TranslateConfig(steps=10, height=64, width=128, feature_injection=0.8,
                                                 attention_injection=0.5), image=guide, cache=cache)
    (source,) = cache._entries.values()
    assert len(source.captured) == 8
    assert [len(step) for step in source.captured] == [17] * 5 + [1] * 3  # q/k while i < 5, feature while i < 8


def test_budget_evicts_least_recently_used(tiny_torch, guide) -> None:
    probe = SourceCache()
    translate(tiny_torch, ["a"], TranslateConfig(**SETTINGS), image=guide, cache=probe)
    one = probe.bytes_used
    cache = SourceCache(budget_bytes=int(2.5 * one))
    images = [guide, guide.rotate(180), guide.transpose(0)]
    for image in images:
        translate(tiny_torch, ["a"], TranslateConfig(**SETTINGS), image=image, cache=cache)
    assert len(cache) == 2 and cache.bytes_used == 2 * one <= cache.budget_bytes
    assert not translate(tiny_torch, ["a"], TranslateConfig(**SETTINGS), image=images[0], cache=cache).source_cache_hit
    assert translate(tiny_torch, ["a"], TranslateConfig(**SETTINGS), image=images[2], cache=cache).source_cache_hit
    assert source_bytes(next(iter(cache._entries.values()))) == one


def test_disk_store_reused_and_corruption_rebuilt(tiny_torch, guide, tmp_path: Path) -> None:
    store = tmp_path / "cache"
    first = translate(tiny_torch, ["a cat"], TranslateConfig(**SETTINGS), image=guide,
                      cache=SourceCache(directory=store))
    (entry,) = store.glob("*.safetensors")
    fresh = translate(tiny_torch, ["a cat"], TranslateConfig(**SETTINGS), image=guide,
                      cache=SourceCache(directory=store))
    assert fresh.source_cache_hit and np.array_equal(fresh.latents, first.latents)
    data = bytearray(entry.read_bytes())
    data[-20:] = bytes(20)  # flip the last feature values: the checksum no longer matches
    entry.write_bytes(bytes(data))
    rebuilt = translate(tiny_torch, ["a cat"], TranslateConfig(**SETTINGS), image=guide,
                        cache=SourceCache(directory=store))
    assert not rebuilt.source_cache_hit and np.array_equal(rebuilt.latents, first.latents)
    entry_bytes = entry.read_bytes()
    entry.write_bytes(b"not safetensors")  # not an entry any more: never read, never replaced (see below)
    with pytest.warns(RuntimeWarning, match="not an entry this cache can read .*cached again"):
        assert not translate(tiny_torch, ["a cat"], TranslateConfig(**SETTINGS), image=guide,
                             cache=SourceCache(directory=store)).source_cache_hit
    assert entry.read_bytes() == b"not safetensors"
    foreign = store / f"{'0' * 64}.safetensors"
    foreign.write_bytes(entry_bytes)  # a valid entry stored under another key is not trusted either
    assert SourceCache(directory=store).get("0" * 64, tiny_torch.backend) is None and not foreign.exists()


def test_batched_prompts_equal_one_by_one(tiny_torch, guide) -> None:
    prompts = ["a photo of a cat", "a painting of a dog", "a castle", "the cat in the dog"]
    batched = translate(tiny_torch, prompts, TranslateConfig(**SETTINGS, prompt_batch_size=4), image=guide)
    single = translate(tiny_torch, prompts, TranslateConfig(**SETTINGS, prompt_batch_size=1), image=guide)
    assert batched.stats.unet_evaluations == single.stats.unet_evaluations
    for a, b in zip(batched.images, single.images, strict=True):
        assert psnr(np.asarray(a), np.asarray(b)) >= 45


def test_concurrent_calls_equal_serial_calls(tiny_torch, guide) -> None:
    translator = Translator(tiny_torch, SourceCache())
    jobs = [(["a photo of a cat"], guide), (["a painting of a dog", "a castle"], guide),
            (["a cat"], guide.rotate(180)), (["a dog"], None)]
    serial = [translator.translate(p, i, source_prompt=None if i else "a castle", **SETTINGS, prompt_batch_size=2)
              for p, i in jobs]
    fresh = Translator(tiny_torch, SourceCache())
    threaded = in_threads([lambda p=p, i=i: fresh.translate(p, i, source_prompt=None if i else "a castle", **SETTINGS,
                                                             prompt_batch_size=2) for p, i in jobs])
    for a, b in zip(serial, threaded, strict=True):
        assert [np.asarray(x).tobytes() for x in a.images] == [np.asarray(x).tobytes() for x in b.images]


def test_concurrent_misses_on_one_source_build_it_once(tiny_torch, guide) -> None:
    translator = Translator(tiny_torch, SourceCache())
    results = in_threads([lambda p=p: translator.translate([p], guide, **SETTINGS) for p in ("a cat", "a dog", "x")])
    assert sorted(r.source_cache_hit for r in results) == [False, True, True]
    assert sum(r.unet_evaluations for r in results) == (4 + 3) + 3 * 2 * 4  # one inversion + capture in all


@pytest.mark.parametrize("requested", [None, 4])
def test_prompt_batch_never_exceeds_what_the_backend_runs(tiny_model_dir: Path, guide, requested) -> None:
    """A TensorRT engine built for 2 prompts (`--max-batch 2`) says so; the automatic (or a larger requested)
    batch respects it: 5 prompts run as 2 + 2 + 1."""
    import torch

    from pnp_trt.runtime.torch_backend import open_torch

    model = open_torch(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    model.backend.max_prompt_batch = 2
    config = TranslateConfig(**SETTINGS, prompt_batch_size=requested)
    stats = translate(model, [f"prompt {i}" for i in range(5)], config, image=guide).stats
    assert stats.unet_calls == 4 + 1 + 3 * 4  # inversion (2 captures ride along), 1 capture alone, 3 batches


def test_resaved_weights_in_the_same_directory_miss_the_cache(tiny_model_dir: Path, tmp_path: Path, guide) -> None:
    """The cache keys a local model by its weight files, not its path: re-saving other weights there must not
    bring back the old model's features."""
    import shutil

    import torch
    from diffusers import UNet2DConditionModel

    from pnp_trt.runtime.torch_backend import open_torch

    model_dir = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    cache = tmp_path / "cache"
    first = Translator(open_torch(str(model_dir)), SourceCache(directory=cache)).translate(["a cat"], guide,
                                                                                          **SETTINGS)
    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", use_safetensors=True)
    with torch.no_grad():
        unet.conv_in.weight.mul_(1.5)
    unet.save_pretrained(model_dir / "unet", safe_serialization=True)
    second = Translator(open_torch(str(model_dir)), SourceCache(directory=cache)).translate(["a cat"], guide,
                                                                                           **SETTINGS)
    assert not second.source_cache_hit
    assert not np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    again = Translator(open_torch(str(model_dir)), SourceCache(directory=cache)).translate(["a cat"], guide,
                                                                                          **SETTINGS)
    assert again.source_cache_hit


def test_a_well_formed_entry_with_wrong_shapes_is_rebuilt(tiny_torch, guide, tmp_path: Path) -> None:
    """An entry under the right key, checksummed, but with tensors of other shapes (forged or from a bug) is
    not used: the source is rebuilt and the result equals an uncached run."""
    from pnp_trt.runtime.cache import read_source, write_source
    from pnp_trt.runtime.sampler import Source

    store = tmp_path / "store"
    first = Translator(tiny_torch, SourceCache(directory=store)).translate(["a cat"], guide, **SETTINGS)
    [entry] = store.glob("*.safetensors")
    key = entry.stem
    real = read_source(store, key, tiny_torch.backend)
    forged = Source(real.start[:, :, :4, :4], [{name: a[..., :3] for name, a in step.items()}
                                               for step in real.captured])
    write_source(store, key, forged, tiny_torch.backend)
    again = Translator(tiny_torch, SourceCache(directory=store)).translate(["a cat"], guide, **SETTINGS)
    assert not again.source_cache_hit
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(first.images[0]))


def _forge(path: Path, change_tensors, change_metadata) -> None:
    """Rewrite a stored source with its checksum recomputed, as a forger (or a bug) with our code would."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from pnp_trt.runtime.cache import _checksum

    with safe_open(str(path), framework="numpy") as f:
        metadata, tensors = dict(f.metadata()), {name: f.get_tensor(name) for name in f.keys()}
    tensors = change_tensors(tensors)
    save_file(tensors, str(path), change_metadata({**metadata, "sha256": _checksum(tensors)}))


FORGED_ENTRIES = {
    "10^8 steps": (lambda t: t, lambda m: {**m, "steps": str(10**8)}),
    "steps not a number": (lambda t: t, lambda m: {**m, "steps": "two"}),
    "all-NaN start": (lambda t: {**t, "start": np.full_like(t["start"], np.nan)}, lambda m: m),
    "an infinite feature": (lambda t: {k: (np.full_like(v, np.inf) if k.startswith("step0.") else v)
                                       for k, v in t.items()}, lambda m: m),
    "no start": (lambda t: {k: v for k, v in t.items() if k != "start"}, lambda m: m),
    "a step missing": (lambda t: {k: v for k, v in t.items() if not k.startswith("step0.")}, lambda m: m),
    "a tensor of another name": (lambda t: {**t, "../evil": t["start"]}, lambda m: m),
    "integer tensors": (lambda t: {k: v.astype(np.int32) for k, v in t.items()}, lambda m: m),
    "float16 in an fp32 store": (lambda t: {k: v.astype(np.float16) for k, v in t.items()}, lambda m: m),  # round 6
}


@pytest.mark.parametrize("case", FORGED_ENTRIES)
def test_a_checksummed_but_malformed_entry_is_rebuilt(tiny_torch, guide, tmp_path: Path, case: str) -> None:
    """The checksum proves the bytes unchanged, not that they are usable: every field read from an entry is
    checked (no hang on a huge step count, no black image from NaNs, no KeyError), and the source rebuilt."""
    from pnp_trt.runtime.cache import read_source

    store = tmp_path / "store"
    first = Translator(tiny_torch, SourceCache(directory=store)).translate(["a cat"], guide, **SETTINGS)
    [entry] = store.glob("*.safetensors")
    _forge(entry, *FORGED_ENTRIES[case])
    assert read_source(store, entry.stem, tiny_torch.backend) is None and not entry.exists()
    again = Translator(tiny_torch, SourceCache(directory=store)).translate(["a cat"], guide, **SETTINGS)
    assert not again.source_cache_hit
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(first.images[0]))


def test_a_translation_saves_its_images_and_record(tiny_torch, tmp_path: Path) -> None:
    """`Translator(...).translate(...).save(directory)`: one PNG per prompt in order plus translate.json, and a
    second save there replaces the first as one set."""
    import json

    from PIL import Image

    guide_file = random_image(tmp_path / "g.png", 128, 64)
    result = Translator(tiny_torch).translate(["a cat", "a dog"], str(guide_file), **SETTINGS)
    written = result.save(tmp_path / "out")
    assert [p.name for p in written] == ["0_a-cat.png", "1_a-dog.png"]
    for path, image in zip(written, result.images, strict=True):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))
    record = json.loads((tmp_path / "out" / "translate.json").read_text())
    assert record["prompts"] == ["a cat", "a dog"] and record["image"] == str(guide_file)
    assert record["unet_evaluations"] == result.unet_evaluations and record["settings"]["steps"] == 4
    assert record["model"] == tiny_torch.identity and record["backend"] == "torch"
    bird = Translator(tiny_torch).translate(["a bird"], str(guide_file), **SETTINGS)
    bird.save(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0_a-bird.png", "translate.json"]
    single = bird.save_image(tmp_path / "bird.png")  # one image, its record inside
    assert json.loads(Image.open(single).text["pnp-trt"])["prompts"] == ["a bird"]
    with pytest.raises(PnPError, match="has 2; use save"):
        result.save_image(tmp_path / "two.png")
    assert not (tmp_path / "two.png").exists()


def test_the_disk_store_keeps_within_its_byte_budget(tiny_torch, guide, tmp_path: Path) -> None:
    """Past the directory's budget the least recently used source goes (a hit counts as a use); files that are
    not cache entries stay."""
    import os

    store = tmp_path / "cache"
    (tmp_path / "cache").mkdir()
    (store / "notes.txt").write_text("mine")

    def run(steps: int) -> bool:
        config = TranslateConfig(**{**SETTINGS, "steps": steps})
        return translate(tiny_torch, ["a cat"], config, image=guide, cache=cache).source_cache_hit

    cache = SourceCache(directory=store, disk_budget_bytes=10 * 2**30)
    run(4)
    (entry_a,) = store.glob("*.safetensors")
    one_entry = entry_a.stat().st_size
    cache = SourceCache(budget_bytes=0, directory=store, disk_budget_bytes=int(2.5 * one_entry))
    os.utime(entry_a, (1, 1))  # long unused
    run(5)
    run(6)  # a third entry would pass the budget: the least recently used (A) goes
    assert not entry_a.exists() and len(list(store.glob("*.safetensors"))) == 2
    assert (store / "notes.txt").read_text() == "mine"
    assert run(5)  # still there, and now the most recently used
    run(4)
    assert run(5) and len(list(store.glob("*.safetensors"))) == 2


def test_the_guidance_is_checked_once_per_call_and_its_file_recorded(tiny_torch, tmp_path: Path,
                                                                       monkeypatch) -> None:
    """One check of the guidance per translation, whichever surface called (the Translator used to normalise
    it again inside `translate`, printing a damaged-EXIF warning twice), and a path given is the record's."""
    from PIL import ImageOps

    from pnp_trt import images

    calls = []
    transpose = ImageOps.exif_transpose
    monkeypatch.setattr(ImageOps, "exif_transpose", lambda image: calls.append(1) or transpose(image))
    path = random_image(tmp_path / "g.png", 128, 64)
    result = Translator(tiny_torch).translate(["a cat"], path, steps=2, height=64, width=128)
    assert len(calls) == 1 and result.guidance_file == str(path) and result.record["image"] == str(path)
    checked = images.check_guidance(str(path))
    assert len(calls) == 2 and images.check_guidance(checked) is checked
    assert translate(tiny_torch, ["a cat"], TranslateConfig(steps=2, height=64, width=128), checked).guidance_file \
        == str(path) and len(calls) == 2


def test_eviction_never_deletes_a_file_the_cache_did_not_write(tiny_torch, guide, tmp_path: Path) -> None:
    """Eviction deletes entries only: a user's file with an entry's kind of name (64 hex digits + .safetensors,
    even a valid safetensors file) stays (eviction went by the name alone). The budget of one entry and a half
    makes the second source evict the first."""
    from safetensors.numpy import save_file

    cache_dir = tmp_path / "c"
    cache_dir.mkdir()
    theirs = cache_dir / f"{'cd' * 32}.safetensors"
    save_file({"w": np.zeros(3, np.float32)}, str(theirs))
    raw = cache_dir / f"{'ef' * 32}.safetensors"
    raw.write_bytes(b"\0" * 100)
    Translator(tiny_torch, SourceCache(directory=cache_dir)).translate(["a cat"], guide, **SETTINGS)
    [first] = set(cache_dir.glob("*.safetensors")) - {theirs, raw}
    budget = int(1.5 * first.stat().st_size)  # counts entries only: the user's files are not the cache's
    Translator(tiny_torch, SourceCache(directory=cache_dir, disk_budget_bytes=budget)).translate(
        ["a cat"], guide, **SETTINGS, inversion_steps=8)
    assert theirs.exists() and raw.exists() and not first.exists()
    assert len(list(cache_dir.glob("*.safetensors"))) == 3  # theirs, raw, and the newest entry only


@pytest.mark.parametrize(("call", "fragment"), [
    (lambda t, g: SourceCache(budget_bytes=-1), "cache_bytes must be between 0"),
    (lambda t, g: SourceCache(budget_bytes="2GB"), "cache_bytes must be a whole number"),
    (lambda t, g: SourceCache(directory=5), "cache_dir must be a path"),
    (lambda t, g: SourceCache(disk_budget_bytes=-5), "cache_dir_bytes must be between 0"),
    (lambda t, g: t.translate(["a"], g, **SETTINGS, progress=lambda stage, total: None),
     "must return a function advance()"),
    (lambda t, g: t.translate(["a"], g, **SETTINGS, decode_guidance="yes"), "decode_guidance must be true or"),
    (lambda t, g: t.translate(["a"], _closed(g), **SETTINGS), "the guidance image cannot be read"),
    (lambda t, g: t.translate(["a"], g, **SETTINGS).save(5), "save's directory must be a path"),
    (lambda t, g: t.translate(["a"], g, **SETTINGS).save_image(5), "save_image's path must be a path"),
])
def test_api_arguments_of_the_wrong_kind_are_one_line(tiny_torch, guide, call, fragment: str) -> None:
    with pytest.raises(PnPError, match=re.escape(fragment)):
        call(Translator(tiny_torch), guide)


def _closed(image):
    copy = image.copy()
    copy.close()
    return copy


def test_numpy_numbers_are_settings_like_any_other(tiny_torch, guide) -> None:
    """numpy integers and floats pass validation and reach the record as plain JSON numbers."""
    import json

    result = Translator(tiny_torch).translate(["a"], guide, steps=np.int64(2), height=np.int64(64), width=128,
                                              guidance_scale=np.float32(5.0))
    record = json.loads(json.dumps(result.record))
    assert record["settings"]["steps"] == 2 and type(result.settings.steps) is int


@pytest.mark.parametrize(("call", "fragment"), [
    (lambda t, g: t.translate(["a"], g, **SETTINGS, progress=lambda: None), "progress must be a function"),
    (lambda t, g: Translator.open("torch", model="m", cuda_graphs="no"), "cuda_graphs must be true or false"),
    (lambda t, g: Translator.open("torch", model="m", limits={"max_steps": 5}), "limits must be a pnp_trt"),
])
def test_more_api_arguments_of_the_wrong_kind(tiny_torch, guide, call, fragment: str) -> None:
    with pytest.raises(PnPError, match=re.escape(fragment)):
        call(Translator(tiny_torch), guide)


def test_a_users_file_under_an_entrys_name_is_never_read_replaced_or_deleted(tiny_torch, guide,
                                                                              tmp_path: Path) -> None:
    """Corpus round 5: a user's file named exactly like the entry a translation writes was overwritten by it
    (and a non-safetensors one deleted as "corrupt"); the cache now warns and leaves it."""
    store = tmp_path / "cache"
    translate(tiny_torch, ["a cat"], TranslateConfig(**SETTINGS), image=guide, cache=SourceCache(directory=store))
    (entry,) = store.glob("*.safetensors")
    entry.write_text("my notes")
    cache = SourceCache(directory=store)
    with pytest.warns(RuntimeWarning, match="not an entry this cache can read .*cached again"):
        again = translate(tiny_torch, ["a cat"], TranslateConfig(**SETTINGS), image=guide, cache=cache)
    assert not again.source_cache_hit and entry.read_text() == "my notes"
    other = 255 - np.asarray(guide)  # corpus 12: the cache goes on for every other source
    translate(tiny_torch, ["a cat"], TranslateConfig(**SETTINGS), image=other, cache=cache)
    assert len(list(store.glob("*.safetensors"))) == 2 and entry.read_text() == "my notes"


def test_a_source_larger_than_the_directory_budget_is_not_stored(tiny_torch, guide, tmp_path: Path) -> None:
    """Corpus round 6: a 69 KB entry stayed in a directory whose budget (`--cache-dir-gib 1e-7`) was 107 bytes:
    the entry just written was never trimmed. One larger than the whole budget is now not written at all."""
    store = tmp_path / "store"
    Translator(tiny_torch, SourceCache(directory=store, disk_budget_bytes=107)).translate(["a cat"], guide,
                                                                                         **SETTINGS)
    assert list(store.iterdir()) == []
    Translator(tiny_torch, SourceCache(directory=store)).translate(["a cat"], guide, **SETTINGS)
    assert len(list(store.iterdir())) == 1  # corpus 12: a budget lowered since applies to what is there
    small = SourceCache(directory=store, disk_budget_bytes=107)
    Translator(tiny_torch, small).translate(["a cat"], 255 - np.asarray(guide), **SETTINGS)
    assert list(store.iterdir()) == []


def test_the_newest_source_stays_even_over_the_budget(tiny_torch, guide) -> None:
    """Review of the SDXL path: a 1024² SDXL source (4 GiB) never fitted the default 2 GiB budget and was dropped,
    so every prompt paid for inversion and capture again. The newest source now stays (alone) whatever its size;
    budget 0 still keeps none."""
    cache = SourceCache(budget_bytes=1)
    translator = Translator(tiny_torch, cache)
    assert not translator.translate(["a cat"], guide, **SETTINGS).source_cache_hit
    assert len(cache) == 1 and translator.translate(["a dog"], guide, **SETTINGS).source_cache_hit
    off = SourceCache(budget_bytes=0)
    Translator(tiny_torch, off).translate(["a cat"], guide, **SETTINGS)
    assert len(off) == 0


def test_a_cache_directory_that_cannot_be_made_says_why_and_what_to_do(tiny_torch, guide) -> None:
    """Corpus 14 (K11): it warned with Python's exception text ("FileNotFoundError: [Errno 2] …") and no fix."""
    with pytest.warns(RuntimeWarning, match=r"^source cache /proc/pnp-trt-cache cannot be written \(No such file or "
                                            r"directory\); going on without it: give --cache-dir a directory that"):
        cache = SourceCache(directory=Path("/proc/pnp-trt-cache"))
        translate(tiny_torch, ["a cat"], TranslateConfig(**SETTINGS), image=guide, cache=cache)
