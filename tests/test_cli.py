"""`pnp-trt translate` end to end on the tiny model, and every bad input → one line, exit 2, no output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import GOLDEN, random_image
from PIL import Image
from typer.testing import CliRunner

from pnp_trt.cli import app
from pnp_trt.images import output_size

runner = CliRunner()
FAST = ["--steps", "3"]


def run(*args: str | Path):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(result, fragment: str) -> None:
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert len(lines) == 1 and fragment in lines[0], result.output


def test_one_prompt_writes_one_image(tiny_model_dir: Path, tmp_path: Path) -> None:
    guide = random_image(tmp_path / "in.png", 150, 100)
    out = tmp_path / "out.png"
    result = run("translate", guide, "--model", tiny_model_dir, "-p", "a photo of a cat", "--out", out,
                 "--width", "192", *FAST)
    assert result.exit_code == 0, result.output
    assert Image.open(out).size == (192, 128)
    assert "UNet evaluations" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png", "out.png"]
    record = json.loads(Image.open(out).text["pnp-trt"])  # the record travels inside the one image
    assert record["prompts"] == ["a photo of a cat"] and record["settings"]["steps"] == 3
    assert record["outputs"] == ["out.png"] and record["image"] == str(guide) and record["size"] == [128, 192]


def test_several_prompts_square(tiny_model_dir: Path, tmp_path: Path) -> None:
    guide = random_image(tmp_path / "in.png", 64, 64)
    prompts = [f"a painting of a cat {i}" for i in range(11)]
    args = [a for p in prompts for a in ("-p", p)]
    result = run("translate", guide, "--model", tiny_model_dir, *args, "--out", tmp_path / "out", "--steps", "2",
                 "--height", "64", "--width", "64", "--prompt-batch-size", "4")
    assert result.exit_code == 0, result.output
    pngs = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name.split("_", 1)[0] for p in pngs] == [f"{i:02d}" for i in range(11)]
    assert all(Image.open(p).size == (64, 64) for p in pngs)
    record = json.loads((tmp_path / "out" / "translate.json").read_text())
    assert record["prompts"] == prompts and record["outputs"] == [p.name for p in pngs]
    assert record["settings"]["steps"] == 2 and record["settings"]["seed"] == 0
    assert set(record["timings_s"]) >= {"encode", "invert", "capture", "inject", "decode"}
    # 2 inversion + 1 capture (only step 0 injects: int(2·0.8) = int(2·0.5) = 1) + 2 branches × 2 steps × 11
    assert record["unet_evaluations"] == 2 + 1 + 2 * 2 * 11
    assert "torch" in record["versions"]
    assert record["unet_calls"] == 2 + 1 + 2 * 3  # step 0 captures the last inversion latent: a call of its own


def test_rerun_into_the_same_directory_replaces_the_results_as_a_set(tiny_model_dir: Path, tmp_path: Path) -> None:
    guide = random_image(tmp_path / "in.png", 64, 64)
    for prompts in (["a cat", "a dog", "a fox"], ["an owl", "a bat"]):
        args = [a for p in prompts for a in ("-p", p)]
        result = run("translate", guide, "--model", tiny_model_dir, *args, "--out", tmp_path / "out", "--steps", "1")
        assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["0_an-owl.png", "1_a-bat.png", "translate.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_directory_with_other_files_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    guide = random_image(tmp_path / "in.png", 64, 64)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "holiday.jpg").write_bytes(b"mine")
    result = run("translate", guide, "--model", tiny_model_dir, "-p", "a", "-p", "b", "--out", tmp_path / "out")
    assert_user_error(result, "holds files pnp-trt did not write, or that changed since it wrote them (holiday.jpg)")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["holiday.jpg"]


def test_generated_guidance_non_square(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run("translate", "--source-prompt", "a photo of a castle", "--model", tiny_model_dir,
                 "-p", "a cat", "-p", "a dog", "--out", out, "--height", "64", "--width", "128", *FAST)
    assert result.exit_code == 0, result.output
    images = [Image.open(p) for p in sorted(out.glob("*.png"))]
    assert [im.size for im in images] == [(128, 64)] * 2
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


@pytest.mark.parametrize("mode", ["RGBA", "L", "I;16", "P", "LA"])
def test_other_image_modes_are_converted(tiny_model_dir: Path, tmp_path: Path, mode: str) -> None:
    guide = tmp_path / "in.png"
    if mode == "I;16":
        Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(guide)
        assert Image.open(guide).mode.startswith("I")
    else:
        random_image(guide, 64, 64, mode=mode)
    result = run("translate", guide, "--model", tiny_model_dir, "-p", "x", "--out", tmp_path / "o.png",
                 "--steps", "1")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "o.png").mode == "RGB"


def test_default_size_keeps_aspect_short_side_512() -> None:
    assert output_size(768, 512, None, None) == (512, 768)
    assert output_size(1000, 700, None, None) == (512, 704)
    assert output_size(300, 300, None, None) == (512, 512)
    assert output_size(150, 100, None, 192) == (128, 192)


def huge_header_png(path: Path) -> Path:
    """A 149-byte-class PNG whose header says 12,000×12,000 and whose body is a 64×64 image's."""
    import struct
    import zlib

    data = bytearray(random_image(path, 64, 64).read_bytes())
    data[16:24] = struct.pack(">II", 12000, 12000)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(200)))
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    return {"corrupt": corrupt, "text": text, "small": random_image(tmp_path / "small.png", 40, 80),
            "huge": huge_header_png(tmp_path / "huge.png"), "loop": tmp_path / "loop-a"}


@pytest.mark.parametrize("case,args,fragment", [
    ("missing", ["{tmp}/nope.png"], "does not exist"),
    ("corrupt", ["{corrupt}"], "cannot read"),
    ("text", ["{text}"], "cannot read"),
    ("small", ["{small}"], "at least 64 px"),
    ("huge", ["{huge}"], "the limit is 50 Mpx"),
    ("directory", ["{tmp}"], "is a directory; pass the path of a PNG/JPEG image"),
    ("nan-scale", ["{guide}", "--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
    ("inf-scale", ["{guide}", "--guidance-scale", "inf"], "--guidance-scale must be a finite number"),
    ("nan-source-scale", ["--source-prompt", "a castle", "--source-guidance-scale", "nan"],
     "--source-guidance-scale must be a finite number"),
    ("seed", ["--source-prompt", "a castle", "--seed", "-1"], "--seed must be between 0 and 4294967295, got -1"),
    ("tau_f", ["{guide}", "--feature-injection", "1.5"], "--feature-injection must be between 0 and 1"),
    ("tau_a", ["{guide}", "--attention-injection", "-0.1"], "--attention-injection must be between 0 and 1"),
    ("steps", ["{guide}", "--steps", "0"], "--steps must be at least 1"),
    ("inversion", ["{guide}", "--steps", "4", "--inversion-steps", "6"], "never visits sampling timestep"),
    ("backend", ["{guide}", "--backend", "jax"], "unknown backend 'jax'"),
    ("size", ["{guide}", "--height", "100"], "multiple of 64"),
    ("no-guidance", [], "exactly one"),
    ("out-dir-missing", ["{guide}", "--out", "{tmp}/no/such/dir/o.png"], "does not exist"),
    ("out-is-dir", ["{guide}", "--out", "{tmp}"], "is a directory"),
    ("out-ends-in-slash", ["{guide}", "--out", "{tmp}/o.png/"], "ends in /, naming a directory"),
    ("empty-prompt", ["{guide}", "-p", ""], "prompt 1 must not be empty"),
    ("blank-prompt", ["{guide}", "-p", "   "], "prompt 1 must not be empty"),
    ("huge-scale", ["{guide}", "--guidance-scale", "1e308"], "--guidance-scale must be between -1000 and 1000"),
    ("long-guidance-name", ["{tmp}/" + "x" * 300 + ".png"], "(File name too long)"),
    ("guidance-ends-in-slash", ["{guide}/"], "(Not a directory)"),
    ("blank-source-prompt", ["--source-prompt", "   "], "the source prompt must not be empty"),
    ("onnxruntime-with-model", ["{guide}", "--backend", "onnxruntime", "--engines", "{tmp}"],
     "--model is for the torch backend"),
    ("torch-with-engines", ["{guide}", "--engines", "{tmp}"], "--engines is for the onnxruntime and tensorrt"),
    ("cache-inside-out", ["{guide}", "-p", "a dog", "--out", "{tmp}/res", "--cache-dir", "{tmp}/res/cache"],
     "is inside --out"),
    ("out-in-a-link-loop", ["{guide}", "--out", "{loop}/o.png"], "loop-a is a loop of symbolic links"),  # round 6
    ("cache-gib-huge", ["{guide}", "--cache-dir", "{tmp}/c", "--cache-dir-gib", "1e30"],
     "--cache-dir-gib must be between 0 and"),
])
def test_bad_input_one_line_exit_2_nothing_written(tiny_model_dir: Path, tmp_path: Path, case: str,
                                                   args: list[str], fragment: str) -> None:
    names = {"tmp": str(tmp_path), "guide": str(random_image(tmp_path / "guide.png", 64, 64)),
             **{k: str(v) for k, v in _bad_files(tmp_path).items()}}
    before = sorted(tmp_path.rglob("*"))
    args = [a.format(**names) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "o.png")]
    steps = [] if "--steps" in args else ["--steps", "4"]
    result = run("translate", *args, "--model", tiny_model_dir, "-p", "a cat", *out, *steps)
    assert_user_error(result, fragment)
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.parametrize("args,fragment", [
    ([], "does not exist"),
    (["--steps", "abc"], "Invalid value for '--steps'"),  # the parser's own refusals: one line as well
    (["--steps", "1_0"], "'1_0' is not a whole number"),  # int() reads it as 10
    (["--steps", "2.0"], "'2.0' is not a whole number"),
    (["--steps", "\u00a02"], "is not a whole number"),  # round 7: spaces around digits are ASCII ones
    (["--guidance-scale", "7_5"], "'7_5' is not a number"),
    (["--bogus-flag"], "No such option: --bogus-flag"),
    (["--cache-dir", ""], "Invalid value for '--cache-dir': is empty; give a path"),  # Path('') would be "."
    (["--engines", "", "--backend", "onnxruntime"], "Invalid value for '--engines': is empty; give a path"),
    (["--out", "{tmp}/x.png/o.png"], "x.png does not exist"),
    (["--backend", "onnxruntime", "--engines", __file__], "is a file, not a directory"),
])
def test_console_script_user_error_is_one_line(tmp_path: Path, args: list[str], fragment: str) -> None:
    args = [a.format(tmp=tmp_path) for a in args]
    out = [] if "--out" in args else ["--out", str(tmp_path / "o.png")]
    guide = [str(GOLDEN / "guide.png") if "--engines" in args else str(tmp_path / "x.png")]
    result = subprocess.run([sys.executable, "-m", "pnp_trt.cli", "translate", *guide, "-p", "a", *out, *args],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0 and fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_every_setting_is_a_translate_flag_defaulting_to_the_librarys() -> None:
    """The CLI retypes no default: each `TranslateConfig` field is a flag whose default is the field's."""
    import dataclasses

    import typer.main

    from pnp_trt.config import TranslateConfig

    command = typer.main.get_command(app).commands["translate"]
    flags = {param.name: param.default for param in command.params}
    assert {f.name: flags.get(f.name, "missing") for f in dataclasses.fields(TranslateConfig)} == \
        dataclasses.asdict(TranslateConfig())


def test_a_model_directory_given_as_engines_is_named_as_one(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Corpus 14 (X21): it said only "has no manifest.json", and the hint exported MODEL over it."""
    guide = random_image(tmp_path / "in.png", 64, 64)
    assert_user_error(run("translate", guide, "--backend", "onnxruntime", "--engines", tiny_model_dir, "-p", "a",
                          "--out", tmp_path / "o.png"),
                      f"{tiny_model_dir} is a diffusers model, not an exported directory; run it with --backend torch")


def test_a_cache_inside_an_earlier_results_directory_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Corpus 14 (P25): it was accepted, and the earlier set was then one pnp-trt refused to replace."""
    guide = random_image(tmp_path / "in.png", 64, 64)
    done = run("translate", guide, "--model", tiny_model_dir, "-p", "a", "-p", "b", "--steps", "1", "--out",
               tmp_path / "earlier")
    assert done.exit_code == 0, done.output
    before = sorted(os.listdir(tmp_path / "earlier"))
    assert_user_error(run("translate", guide, "--model", tiny_model_dir, "-p", "a", "--steps", "1", "--out",
                          tmp_path / "new.png", "--cache-dir", tmp_path / "earlier" / "cache"),
                      "is inside the results of an earlier run")
    # corpus 15 (A78, H80): the API and the server refuse it too, before loading anything
    from pnp_trt import Translator
    from pnp_trt.errors import PnPError
    with pytest.raises(PnPError, match="cache_dir .* is inside the results of an earlier run"):
        Translator.open("torch", model=tiny_model_dir, cache_dir=tmp_path / "earlier" / "cache")
    assert_user_error(run("serve", "--backend", "torch", "--model", tiny_model_dir, "--cache-dir",
                          tmp_path / "earlier" / "cache"),
                      "is inside the results of an earlier run")
    assert sorted(os.listdir(tmp_path / "earlier")) == before and not (tmp_path / "new.png").exists()


@pytest.mark.parametrize("args,env,fragment", [
    (["serve", "--port", "80000"], {}, "--port must be between 1 and 65535, got 80000"),
    (["serve", "--port", "-1"], {}, "--port must be between 1 and 65535, got -1"),
    (["serve", "--coalesce-ms", "nan"], {}, "--coalesce-ms must be a finite number"),
    (["serve", "--coalesce-ms", "1e12"], {}, "--coalesce-ms must be between 0 and 60000"),
    (["serve", "--deadline-s", "1e12"], {}, "--deadline-s must be between 0 and 86400"),  # corpus 14 O07
    (["translate", "x.png", "-p", "a", "--out", "o.png", "--threads", "100000"], {}, "--threads must be between 1"),
    (["translate", "x.png", "-p", "a", "--out", "o.png"], {"PNP_TRT_THREADS": "abc"},
     "PNP_TRT_THREADS must be a whole number of threads"),
    (["translate", "x.png", "-p", "a", "--out", "o.png"], {"PNP_TRT_THREADS": "\uff11"},  # round 7: fullwidth 1
     "PNP_TRT_THREADS must be a whole number of threads"),
    (["serve", "--max-input-mpx", "0.001"], {}, "--max-input-mpx 0.001 refuses every image"),
    (["serve", "--max-output-mpx", "0.004"], {}, "--max-output-mpx 0.004 refuses every image"),  # round 8
    (["serve", "--max-upload-mb", "1e-300"], {}, "--max-upload-mb 1e-300 would refuse nearly every request"),
    (["translate", "x.png", "-p", "a", "--out", "o.png", "--max-output-mpx", "inf"], {},
     "--max-output-mpx must be a finite positive number, got inf"),  # round 9
    (["translate", "x.png", "-p", "a", "--out", "o.png", "--cache-dir", "o.png"], {},
     "--cache-dir o.png is inside --out o.png (or is it)"),
    (["translate", "x.png", "-p", "a", "--out", "o.png", "--guidance-scale", "1000.0001"], {},
     "--guidance-scale must be between -1000 and 1000, got 1000.0001"),
])
def test_process_settings_are_bounded(args: list[str], env: dict, fragment: str, monkeypatch) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PNP_TRT_THREADS", raising=False) if not env else None
    assert_user_error(run(*args), fragment)


@pytest.mark.parametrize("args,fragment", [
    (["translate", "x.png", "-p", "a", "--out", "o.png", "--provider", "cpu"],
     "--provider applies to --backend onnxruntime"),
    (["translate", "x.png", "-p", "a", "--out", "o.png", "--backend", "tensorrt", "--provider", "cuda"],
     "--provider applies to --backend onnxruntime"),
    (["translate", "x.png", "-p", "a", "--out", "o.png", "--cache-dir-gib", "1"],
     "--cache-dir-gib applies with --cache-dir"),
    (["translate", "x.png", "-p", "a", "--out", "o.png", "--source-guidance-scale", "3"],
     "--source-guidance-scale applies with --source-prompt"),
    (["translate", "x.png", "-p", "a", "--out", "o.png", "--seed", "3"], "--seed applies with --source-prompt"),
    (["serve", "--replicas", "2"], "--replicas applies with --ray"),
    (["serve", "--gpus-per-replica", "0"], "--gpus-per-replica applies with --ray"),
    (["serve", "--backend", "torch", "--provider", "cuda"], "--provider applies to --backend onnxruntime"),
    (["serve", "--backend", "torch", "--engines", "e"], "--engines is for the onnxruntime and tensorrt backends"),
    (["serve", "--model", "m"], "--model is for the torch backend"),
])
def test_a_flag_that_does_nothing_here_is_refused(args: list[str], fragment: str) -> None:
    """Flags that would be silently ignored in this run (they apply to another backend or mode) are refused,
    saying when they apply, before anything is loaded."""
    assert_user_error(run(*args), fragment)


def test_the_api_refuses_a_provider_for_another_backend() -> None:
    from pnp_trt import Translator
    from pnp_trt.errors import PnPError

    with pytest.raises(PnPError, match="^provider is for the onnxruntime backend"):
        Translator.open("torch", provider="cuda")


def test_help_is_h_too_and_keeps_every_flag_name_whole() -> None:
    """-h works; at 80 columns no flag name is cut (rich's option table cut them to `--inversion-ste…`)."""
    result = CliRunner().invoke(app, ["translate", "-h"], terminal_width=80)
    assert result.exit_code == 0
    for flag in ("--inversion-steps", "--negative-prompt", "--attention-injection", "--source-guidance-scale",
                 "--prompt-batch-size", "--cache-dir-gib"):
        assert flag in result.output, flag
    assert "…" not in result.output


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0 and result.stdout.startswith("pnp-trt ")


def test_a_run_under_nohup_goes_on_after_a_hangup(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Corpus 13: the console script replaced an inherited SIG_IGN for SIGHUP, so `nohup pnp-trt ...` died (129)
    when its terminal closed."""
    import signal
    import time

    guide = random_image(tmp_path / "in.png", 64, 64)
    process = subprocess.Popen([sys.executable, "-m", "pnp_trt.cli", "translate", str(guide), "--model",
                                str(tiny_model_dir), "-p", "a", "--out", str(tmp_path / "o.png"), "--steps", "4"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    time.sleep(0.5)  # past the console script's first moment, still importing torch
    assert process.poll() is None
    process.send_signal(signal.SIGHUP)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0 and (tmp_path / "o.png").is_file(), stderr


def _default_stop_signals() -> None:
    """A child's stop signals as a terminal's shell starts it, whatever the suite inherited (under `nohup`
    SIGHUP is ignored, and stays so in a run that keeps nohup's wish; a background job ignores SIGINT)."""
    import signal

    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


@pytest.mark.parametrize("signame,code", [("SIGTERM", 143), ("SIGHUP", 129), ("SIGINT-twice", 130),
                                          ("SIGINT-burst", 130)])
def test_stop_signals_clean_up_like_ctrl_c(tiny_model_dir: Path, tmp_path: Path, signame: str, code: int) -> None:
    """SIGTERM, SIGHUP (a closed terminal), Ctrl-C pressed twice mid-translation, or a burst (SIGINT, SIGINT,
    SIGTERM 10 ms apart: a later one used to arrive before the first was handled, and Python raised "Signal 15
    ignored due to race condition" in the cleanup): the shell's exit code for the first, "nothing was written",
    no staging leftovers in the output's folder."""
    import signal
    import time

    guide = random_image(tmp_path / "in.png", 256, 256)
    out = tmp_path / "results"
    out.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "pnp_trt.cli", "translate", str(guide), "--model",
                                str(tiny_model_dir), "-p", "a", "-p", "b", "--out", str(out / "set"), "--steps",
                                "500"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=_default_stop_signals)
    try:
        time.sleep(8)
        process.send_signal(getattr(signal, signame.split("-")[0]))
        if signame.endswith("twice"):
            time.sleep(0.05)
            process.send_signal(signal.SIGINT)
        if signame.endswith("burst"):
            for later in (signal.SIGINT, signal.SIGTERM):
                time.sleep(0.01)
                process.send_signal(later)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()  # a run that did not stop must not go on beside the rest of the suite
    assert process.returncode == code, stderr
    assert "interrupted; nothing was written" in stderr and "Traceback" not in stderr
    assert list(out.iterdir()) == []


def test_a_unet_without_its_presets_layers_is_refused(tmp_path: Path) -> None:
    """A three-level UNet without SDXL's text and size embeddings is told apart as SD, whose preset needs
    up_blocks[2] and [3] attentions: refused, naming what is missing and what to choose."""
    from diffusers import UNet2DConditionModel

    from pnp_trt.contract import ModelDims
    from pnp_trt.errors import PnPError
    from pnp_trt.injection import install_hooks

    unet = UNet2DConditionModel(block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D",
                                "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=32, norm_num_groups=8, attention_head_dim=2)
    points = ModelDims(77, 32, 4, 8, (32, 64, 64)).points
    with pytest.raises(PnPError, match=r"lacks the layers of its injection preset \(up_blocks\.2\.attentions.0.*"
                                       r"choose another --injection-preset"):
        install_hooks(unet, points)


def test_make_tiny_model_is_small_and_offline(tiny_model_dir: Path) -> None:
    size = sum(p.stat().st_size for p in tiny_model_dir.rglob("*") if p.is_file())
    assert size < 20 * 2**20
    assert (tiny_model_dir / "tokenizer" / "vocab.json").exists()
    assert (tiny_model_dir / "tokenizer" / "merges.txt").exists()
    again = run("make-tiny-model", tiny_model_dir)  # the README's command chain can run twice
    assert again.exit_code == 0 and "reusing it" in again.stderr
    assert run("make-tiny-model", tiny_model_dir, "--seed", "1").exit_code == 2


def test_cache_dir_reuses_the_source_across_runs(tiny_model_dir: Path, tmp_path: Path) -> None:
    guide = random_image(tmp_path / "in.png", 64, 64)
    common = ["translate", guide, "--model", tiny_model_dir, "--steps", "3", "--cache-dir", tmp_path / "cache"]
    first = run(*common, "-p", "a cat", "--out", tmp_path / "a.png")
    second = run(*common, "-p", "a dog", "--out", tmp_path / "b.png")
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert "source from cache" not in first.output and "source from cache" in second.output
    assert "UNet evaluations" in second.output and " 6 UNet evaluations" in second.output  # 2 branches × 3 steps
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


def test_a_cache_that_cannot_be_written_only_warns(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The cache is best effort: a cache path that is a file, or a directory planted under an entry's name,
    costs one warning line, never the finished images."""
    guide = random_image(tmp_path / "in.png", 64, 64)
    (tmp_path / "file").write_text("not a directory")
    result = run("translate", guide, "--model", tiny_model_dir, "-p", "a cat", "--out", tmp_path / "a.png",
                 "--steps", "1", "--cache-dir", tmp_path / "file")
    assert result.exit_code == 0 and (tmp_path / "a.png").exists()
    assert result.stderr.count("warning: source cache") == 1 and "Traceback" not in result.stderr
    cache = tmp_path / "cache"
    run("translate", guide, "--model", tiny_model_dir, "-p", "a cat", "--out", tmp_path / "b.png", "--steps", "1",
        "--cache-dir", cache)
    [entry] = cache.glob("*.safetensors")
    entry.unlink()
    entry.mkdir()
    result = run("translate", guide, "--model", tiny_model_dir, "-p", "a dog", "--out", tmp_path / "c.png",
                 "--steps", "1", "--cache-dir", cache)
    assert result.exit_code == 0 and (tmp_path / "c.png").exists()
    assert "warning: source cache" in result.stderr


@pytest.mark.parametrize("prompts", [["a cat"], ["a cat", "a dog"]])
def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(tiny_model_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  prompts: list[str]) -> None:
    """ENOSPC in the middle of writing the results (injected into PIL's PNG writer): exit 2, one line, no
    partial file or staging directory."""
    import errno

    guide = random_image(tmp_path / "in.png", 64, 64)
    out_dir = tmp_path / "out"
    out_dir.mkdir()

    def full(self: Image.Image, fp: object, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    args = [a for p in prompts for a in ("-p", p)]
    out = out_dir / ("x.png" if len(prompts) == 1 else "results")
    result = run("translate", guide, "--model", tiny_model_dir, *args, "--out", out, "--steps", "1")
    assert result.exit_code == 2 and "No space left on device" in result.stderr and "Traceback" not in result.output
    assert list(out_dir.iterdir()) == []


def test_a_generated_guidance_can_be_saved_beside_the_results(tiny_model_dir: Path, tmp_path: Path) -> None:
    """--save-guidance writes the image the source prompt generated: in the results directory (and its record),
    or NAME.guidance.png beside a single output; from the disk cache too."""
    common = ["--source-prompt", "a castle", "--model", tiny_model_dir, "--steps", "2", "--height", "64",
              "--width", "128", "--save-guidance", "--cache-dir", tmp_path / "cache"]
    several = run("translate", *common, "-p", "a cat", "-p", "a dog", "--out", tmp_path / "out")
    assert several.exit_code == 0, several.output
    record = json.loads((tmp_path / "out" / "translate.json").read_text())
    assert record["outputs"][-1] == "guidance.png"
    guidance = np.asarray(Image.open(tmp_path / "out" / "guidance.png"))
    assert guidance.shape == (64, 128, 3) and guidance.std() > 0
    single = run("translate", *common, "-p", "a bird", "--out", tmp_path / "bird.png")  # source from the cache
    assert single.exit_code == 0 and "source from cache" in single.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "bird.guidance.png")), guidance)
    assert json.loads(Image.open(tmp_path / "bird.png").text["pnp-trt"])["outputs"] == ["bird.png",
                                                                                        "bird.guidance.png"]
    rerun = run("translate", *[a for a in common if a != "--save-guidance"], "-p", "a fish", "--out",
                tmp_path / "bird.png")  # corpus 12: the earlier guidance goes with the result it paired, said so
    assert rerun.exit_code == 0 and "removed bird.guidance.png, the guidance of the result replaced" in rerun.stderr
    assert not (tmp_path / "bird.guidance.png").exists()
    single = run("translate", *common, "-p", "a bird", "--out", tmp_path / "bird.png")
    kept = (tmp_path / "bird.guidance.png").read_bytes()
    for overwrite in ([], ["--overwrite"]):  # corpus 13: the paired guidance given as the image was deleted
        reread = run("translate", tmp_path / "bird.guidance.png", "--model", tiny_model_dir, "--steps", "2",
                     "-p", "a fish", "--out", tmp_path / "bird.png", *overwrite)
        assert reread.exit_code == 0 and "removed" not in reread.stderr, reread.output
        assert (tmp_path / "bird.guidance.png").read_bytes() == kept
    refused = run("translate", random_image(tmp_path / "in.png", 64, 64), "--model", tiny_model_dir, "-p", "a",
                  "--out", tmp_path / "x.png", "--save-guidance")
    assert refused.exit_code == 2 and "--save-guidance saves a guidance generated" in refused.stderr


def test_a_pickle_only_model_is_one_line_saying_why(tiny_model_dir: Path, tmp_path: Path) -> None:
    import shutil

    model = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    result = run("translate", "--source-prompt", "a", "-p", "b", "--model", model, "--out", tmp_path / "x.png")
    assert result.exit_code == 2 and "loads only safetensors weights" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def _set(key: str, value: object):
    return lambda text: json.dumps({**json.loads(text), key: value})


@pytest.mark.parametrize("file,change,fragment", [
    ("text_encoder/config.json", _set("hidden_size", "32"), "text_encoder/config.json hidden_size must be a whole"),
    ("unet/config.json", _set("in_channels", "four"), "unet/config.json in_channels must be a whole number"),
    ("unet/config.json", _set("in_channels", "4"), "unet/config.json in_channels must be a whole number"),
    ("unet/config.json", _set("block_out_channels", 32), "block_out_channels must be a list of whole numbers"),
    ("unet/config.json", _set("attention_head_dim", 0), "unet/config.json attention_head_dim must be between 1"),
    ("vae/config.json", _set("scaling_factor", "big"), "vae/config.json scaling_factor must be a number"),
    ("unet/config.json", lambda text: "[1, 2, 3]", "unet/config.json is not a JSON object"),
    ("vae/config.json", _set("force_upcast", "true"), "vae/config.json force_upcast must be true or false"),
    ("unet/config.json", _set("upcast_attention", "false"), "unet/config.json upcast_attention must be true or"),
    ("unet/config.json", _set("norm_eps", float("nan")), "unet/config.json norm_eps must be a finite number"),
    *[(file, _set(key, value), f"{file} {key} must be")  # round 8: every field by its class default's kind
      for file, key, value in (("unet/config.json", "use_linear_projection", "true"),
                               ("unet/config.json", "mid_block_scale_factor", "1"),
                               ("unet/config.json", "resnet_out_scale_factor", float("nan")),
                               ("vae/config.json", "use_quant_conv", 1),
                               ("unet/config.json", "freq_shift", 0.5),
                               ("text_encoder/config.json", "layer_norm_eps", float("nan")))],
    *[(file, _set(key, value), fragment)  # corpus round 9: each was accepted, or an internal error
      for file, key, value, fragment in (
          ("unet/config.json", "freq_shift", 1e308, "freq_shift must be between -16777216 and 16777216"),
          ("unet/config.json", "mid_block_scale_factor", [1], "mid_block_scale_factor must be a number"),
          ("unet/config.json", "attention_type", "gated", "attention_type must be one of 'default'"),
          ("unet/config.json", "_class_name", "UNet2DModel", "_class_name must be one of 'UNet2DConditionModel'"),
          ("unet/config.json", "norm_num_groups", 0, "norm_num_groups must be between 1"),
          ("unet/config.json", "resnet_time_scale_shift", "bogus", "resnet_time_scale_shift must be one of"),
          ("unet/config.json", "time_embedding_dim", 64.5, "time_embedding_dim must be a whole number"),
          ("unet/config.json", "cross_attention_norm", "bogus", "cross_attention_norm must be one of"),
          ("unet/config.json", "mid_block_only_cross_attention", "false", "must be true or false"),
          ("vae/config.json", "layers_per_block", 0, "vae/config.json layers_per_block must be between 1"),
          ("vae/config.json", "shift_factor", float("nan"), "shift_factor must be a finite number"),
          ("vae/config.json", "norm_num_groups", 3, "are not all divisible by norm_num_groups 3"),
          ("text_encoder/config.json", "hidden_act", "nope", "hidden_act must be one of 'quick_gelu'"),
          ("text_encoder/config.json", "model_type", "bert", "model_type must be one of 'clip_text_model'"),
          ("text_encoder/config.json", "num_attention_heads", 3, "hidden_size 32 is not divisible by"),
          ("text_encoder/config.json", "eos_token_id", 100000, "eos_token_id must be between 0 and"),
          ("text_encoder/config.json", "layer_norm_eps", -1, "layer_norm_eps must be between"),
          ("text_encoder/config.json", "projection_dim", -1, "projection_dim must be between 1"),
          ("text_encoder/config.json", "num_hidden_layers", 1, "text_encoder/ holds weights its config does not "
                                                               "use (encoder.layers.1"),
          ("tokenizer/tokenizer_config.json", "model_max_length", 10, "model_max_length is 10; Stable Diffusion"),
          ("tokenizer/tokenizer_config.json", "pad_token", "<|nope|>", "pad_token '<|nope|>' is not in its"),
          ("tokenizer/tokenizer_config.json", "bos_token", "<|nope|>", "bos_token '<|nope|>' is not in its"),
          ("tokenizer/tokenizer_config.json", "eos_token", "<|nope|>", "eos_token '<|nope|>' is not in its"),
          ("scheduler/scheduler_config.json", "steps_offset", "1",  # corpus 12: the model and the fix named
           "has a damaged config: scheduler config `steps_offset` must be a whole number, got '1' (str); fix it"))],
    ("tokenizer/merges.txt", lambda text: "#version: 0.2\n", "tokenizer/merges.txt holds no merges"),
    ("tokenizer/tokenizer_config.json", lambda text: None, "tokenizer/tokenizer_config.json is missing"),
    ("unet/config.json", lambda text: "[" * 100000 + "]" * 100000, "unet/config.json cannot be read as JSON"),
    ("vae/config.json", lambda text: "{not json", "vae/config.json cannot be read as JSON"),
    ("tokenizer/vocab.json", lambda text: "{not json", "tokenizer/vocab.json cannot be read as a JSON object"),
])
def test_a_model_config_of_wrong_types_is_one_line_naming_file_and_field(tiny_model_dir: Path, tmp_path: Path,
                                                                          file: str, change, fragment: str) -> None:
    """Checked before diffusers or transformers read them (their messages named neither the file nor the field,
    or were cut off, or blamed the hub)."""
    import shutil

    model = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, model)
    text = change((model / file).read_text())
    (model / file).write_text(text) if text is not None else (model / file).unlink()
    result = run("translate", "--source-prompt", "a", "-p", "b", "--model", model, "--out", tmp_path / "x.png",
                 "--steps", "1", "--height", "64", "--width", "64")
    assert_user_error(result, fragment)
    assert not (tmp_path / "x.png").exists()


def test_a_tiny_model_changed_since_it_was_made_is_not_reused(tiny_model_dir: Path, tmp_path: Path) -> None:
    """make-tiny-model reuses a directory only if every file is as it wrote it (one flipped byte: refused)."""
    import shutil

    model = tmp_path / "tiny"
    shutil.copytree(tiny_model_dir, model)
    assert "reusing it" in run("make-tiny-model", model).output
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert_user_error(run("make-tiny-model", model), "is not a model made with these settings")


def test_an_internal_error_is_one_line_naming_it_a_bug(tmp_path: Path) -> None:
    """An exception no check anticipated (a bug) reaches the user as one line with exit 1, not a traceback (the
    handler itself once failed on a name typer's click lacks); PNP_TRT_DEBUG=1 shows the traceback."""
    code = ("import sys; import pnp_trt.cli as cli\n"
            "cli.app.command('boom')(lambda: 1 / 0)\n"
            "sys.argv = ['pnp-trt', 'boom']; cli.main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "internal error: ZeroDivisionError: division by zero" in result.stderr and "Traceback" not in result.stderr
    debug = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PNP_TRT_DEBUG": "1"})
    assert "Traceback" in debug.stderr and "ZeroDivisionError" in debug.stderr


def test_serve_on_an_address_it_cannot_listen_on_is_one_line(exported: Path) -> None:
    """A port taken or a host that is no address: refused before the model loads (uvicorn's own exit left a
    traceback)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for host, fragment in (("127.0.0.1", f"cannot listen on 127.0.0.1:{port}"), ("999.1.1.1", "cannot listen")):
            result = subprocess.run([sys.executable, "-m", "pnp_trt.cli", "serve", "--engines", str(exported),
                                     "--host", host, "--port", str(port)], capture_output=True, text=True,
                                    timeout=120)
            assert result.returncode == 2 and fragment in result.stderr, result.stderr
            assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


@pytest.mark.parametrize("args,fragment", [
    (["make-tiny-model", "{tmp}/m", "--seed", "-1"], "--seed must be between 0 and 4294967295"),
    (["export", "--model", "{tiny}", "--out", "{file}/e"], "is a file, not a directory"),
    (["export", "--model", "{tiny}", "--out", "{dangling}"], "is a link to nowhere"),
    (["make-tiny-model", "{dangling}"], "already exists (perhaps as a link)"),
    (["translate", "", "-p", "a", "--model", "{tiny}", "--out", "{tmp}/o.png"], "path is empty"),
    (["translate", "{file}", "-p", "a", "--model", "", "--out", "{tmp}/o.png"], "--model is empty"),
    (["translate", "{eps}", "-p", "a", "--model", "{tiny}", "--out", "{tmp}/o.png"], "cannot read guidance image"),
    (["translate", "{file}", "-p", "a", "--backend", "onnxruntime", "--engines", "{tmp}", "--provider", "gpu",
      "--out", "{tmp}/o.png"], "--provider must be one of 'cpu', 'cuda', 'tensorrt'"),
    (["triton-repo", "{tmp}", "--backend", "torch", "--engines", "{tmp}"], "--engines is for the onnxruntime"),
    (["serve", "--engines", "{tmp}/none"], "none does not exist; pass the directory"),  # was: serving, then 503s
    (["serve"], "--backend onnxruntime serves an exported directory: pass --engines DIR"),
    (["make-tiny-model", "{tmp}/" + "m" * 300], "File name too long"),
    (["triton-repo", "{tmp}", "--engines", "{tmp}", "--provider", "gpu"], "--provider must be one of"),
])
def test_more_commands_refuse_bad_input_in_one_line_before_any_work(tiny_model_dir: Path, tmp_path: Path,
                                                                     args: list[str], fragment: str) -> None:
    """Corpus round 3: each of these was accepted, misreported, or an internal error after the work was done (an
    EPS guidance even ran Ghostscript: only raster formats are opened now)."""
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    guide = random_image(tmp_path / "g.png", 64, 64)
    eps = tmp_path / "x.eps"
    eps.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 100 100\nshowpage\n")
    names = {"tmp": tmp_path, "tiny": tiny_model_dir, "file": guide, "dangling": tmp_path / "dangling", "eps": eps}
    before = sorted(tmp_path.rglob("*"))
    assert_user_error(run(*[a.format(**names) for a in args]), fragment)
    assert sorted(tmp_path.rglob("*")) == before


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_stderr_that_cannot_be_written_does_not_stop_the_work(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Corpus round 5: with stderr on /dev/full (or a closed pipe) the run died at its first progress line, exit 1,
    no result; messages are now dropped and the result is written."""
    guide = random_image(tmp_path / "in.png", 64, 64)
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "pnp_trt.cli", "translate", str(guide), "--model",
                               str(tiny_model_dir), "-p", "a", "--steps", "2", "--out", str(tmp_path / "o.png")],
                              stderr=full, stdout=subprocess.DEVNULL, timeout=120)
    assert done.returncode == 0 and (tmp_path / "o.png").is_file()
    closed = subprocess.run([sys.executable, "-m", "pnp_trt.cli", "translate", str(guide), "--model",
                             str(tiny_model_dir), "-p", "a", "--steps", "2", "--out", str(tmp_path / "c.png")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lambda: os.close(2),
                            timeout=120)  # corpus 12: started with stderr closed (2>&-), sys.stderr is None
    assert closed.returncode == 0 and (tmp_path / "c.png").is_file()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
@pytest.mark.parametrize("args", [["--version"], ["translate", "--help"]])
def test_help_or_version_to_a_full_stdout_is_one_line(args: list[str]) -> None:
    """Corpus 13: they said "internal error: OSError … a pnp-trt bug"."""
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "pnp_trt.cli", *args], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=60)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and lines == ["error: cannot write to standard output (No space left on device)"]


@pytest.mark.parametrize("args", [["--version"], ["--help"]])
def test_help_or_version_with_stdout_closed_is_an_error(args: list[str]) -> None:
    """Corpus 14: with stdout closed at start (`>&-`, sys.stdout None) they printed nothing and exited 0."""
    done = subprocess.run([sys.executable, "-m", "pnp_trt.cli", *args], stderr=subprocess.PIPE, text=True,
                          timeout=60, preexec_fn=lambda: os.close(1))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and lines == ["error: cannot write to standard output (Bad file descriptor)"]


def test_messages_with_no_stderr_at_all_are_dropped(monkeypatch) -> None:
    """Corpus 13: with stderr closed at start (sys.stderr None) the first flush raised AttributeError (exit 1)."""
    from pnp_trt.cli import err

    monkeypatch.setattr(sys, "stderr", None)
    err.print("a message nobody can read")
    err.file.flush()
    assert not err.file.isatty()


def test_weights_that_yield_nan_are_refused_and_nothing_is_written(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Corpus round 5: UNet weights damaged in place (same size) gave exit 0 and a black PNG."""
    from safetensors.numpy import load_file, save_file

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["conv_out.weight"] = np.full_like(tensors["conv_out.weight"], np.nan)
    save_file(tensors, str(weights))
    guide = random_image(tmp_path / "in.png", 64, 64)
    result = run("translate", guide, "--model", model, "-p", "a", "--steps", "2", "--out", tmp_path / "o.png")
    assert result.exit_code == 2 and "Traceback" not in result.output  # found after the work: its progress shows
    assert result.output.strip().splitlines()[-1].startswith("error: the model produced NaN or infinite values")
    assert not (tmp_path / "o.png").exists()
    result = run("export", "--model", model, "--out", tmp_path / "onnx")  # corpus round 6: exported, "validated"
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "the model's unet computes NaN or infinite values (noise_pred)" in result.output.strip().splitlines()[-1]
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("damage,fragment", [
    (lambda w: w.write_bytes(b""), "text_encoder/model.safetensors is not a complete safetensors file"),
    (lambda w: w.write_bytes(w.read_bytes()[:w.stat().st_size // 2]), "is not a complete safetensors file"),
    (lambda w: w.unlink(), "text_encoder/ has no .safetensors weights"),
])
def test_damaged_weight_files_are_named(tiny_model_dir: Path, tmp_path: Path, damage, fragment: str) -> None:
    """Corpus rounds 4-5: an empty or truncated weights file was "header too small" or blamed on pickled weights."""
    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    damage(model / "text_encoder" / "model.safetensors")
    guide = random_image(tmp_path / "in.png", 64, 64)
    assert_user_error(run("translate", guide, "--model", model, "-p", "a", "--steps", "2", "--out",
                          tmp_path / "o.png"), fragment)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _endless(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


def _huge(path: Path) -> None:
    with open(path, "ab") as f:
        f.truncate(65 << 20)  # sparse: 65 MiB of a "config"


def _sentinel_max_length(path: Path) -> None:
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "model_max_length": 1000000000000000019884624838656}))


@pytest.mark.parametrize("file,change,fragment", [
    ("unet/diffusion_pytorch_model.safetensors", _fifo, "unet/diffusion_pytorch_model.safetensors is not a regular "
                                                        "file (a FIFO, device or socket)"),
    ("unet/config.json", _endless, "unet/config.json is not a regular file"),
    ("model_index.json", _fifo, "model_index.json is not a regular file"),
    ("tokenizer/vocab.json", _huge, "tokenizer/vocab.json is 65 MiB, more than a model's .json file ever is"),
    ("tokenizer/tokenizer_config.json", _sentinel_max_length, "model_max_length is 1000000000000000019"),
])
def test_model_files_that_hang_or_never_end_are_one_line(tiny_model_dir: Path, tmp_path: Path, file: str, change,
                                                         fragment: str) -> None:
    """Corpus round 6: a FIFO weight file hung the run, a config linked to /dev/zero read until memory ran out,
    transformers' "no limit" max length (10^30) was an OverflowError. Each is refused before anything reads it."""
    import shutil

    model = tmp_path / "damaged"
    shutil.copytree(tiny_model_dir, model)
    change(model / file)
    result = run("translate", "--source-prompt", "a", "-p", "b", "--model", model, "--out", tmp_path / "x.png",
                 "--steps", "1", "--height", "64", "--width", "64")
    assert_user_error(result, fragment)
    assert not (tmp_path / "x.png").exists()


def test_a_weights_path_that_is_a_directory_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Corpus 11: it was "not a complete safetensors file (No such device)"."""
    import torch

    from pnp_trt.errors import PnPError
    from pnp_trt.models import load_diffusers

    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "m"))
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    weights.unlink()
    weights.mkdir()
    with pytest.raises(PnPError, match="vae/diffusion_pytorch_model.safetensors is not a regular file"):
        load_diffusers(str(copy), torch.device("cpu"), torch.float32)


def test_a_stop_signal_while_the_parser_runs_keeps_its_exit_code_and_says_so(monkeypatch, capsys) -> None:
    """Corpus 11: SIGTERM in the quarter second typer spends building the command exited 130 (Ctrl-C's code),
    silently, or (a few ms later) as a traceback."""
    import signal

    from pnp_trt import cli

    monkeypatch.setattr(cli, "STOPPED_BY", [])
    monkeypatch.setattr(cli, "STOP_SAID", [])
    monkeypatch.setattr(cli, "_handle_stop_signals", lambda: None)
    monkeypatch.setattr(cli, "app", lambda **_: cli._stop(signal.SIGTERM, None))
    with pytest.raises(SystemExit) as stopped:
        cli.main()
    assert stopped.value.code == 143 and "interrupted; nothing was written" in capsys.readouterr().err


def test_an_unknown_hub_id_offline_is_one_line(tmp_path: Path) -> None:
    """Corpus 12: huggingface_hub's deprecation notice (diffusers passes an argument it ignores) came first, as a
    second line; a library's warnings are not the user's to act on. (A process of its own: the hub reads
    HF_HUB_OFFLINE when it is imported.)"""
    guide = random_image(tmp_path / "in.png", 64, 64)
    done = subprocess.run([sys.executable, "-m", "pnp_trt.cli", "translate", str(guide), "--model",
                           "someone/not-a-model", "-p", "a", "--steps", "1", "--out", str(tmp_path / "o.png")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and "cannot load model someone/not-a-model" in lines[0], lines
    assert not (tmp_path / "o.png").exists()
