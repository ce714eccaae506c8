"""`pnp-trt`: a thin typer layer over the library. User mistakes print one line and exit 2."""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import io
import logging
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, cast

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from . import validation
from .config import CLI_OVER_HINT, DEFAULT_DISK_CACHE_BYTES, GENERATION_SETTINGS, Limits, TranslateConfig
from .destination import check_cache_home, check_destination
from .entry import nohup
from .errors import PnPError
from .extras import require
from .fileio import STOP_SIGNALS, ignore_stop_signals, written_before
from .results import guidance_beside, versions
from .serve.limits import ServeOptions

SERVE = ServeOptions()
"""`pnp-trt serve`'s defaults."""
SETTINGS = TranslateConfig()
"""`pnp-trt translate`'s defaults: the library's."""

app = typer.Typer(help="Plug-and-Play Diffusion Features image translation: PyTorch, ONNX Runtime, TensorRT.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  rich_markup_mode=None,  # plain help: rich's option table cut flag names at 80 columns
                  context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})


class ForgivingStream:
    """stderr (as it is at each call) for messages and progress: once it cannot be written (a closed pipe,
    `2>/dev/full`), the rest is dropped and the work goes on: the results, not the chatter about them, are what a
    run is for."""

    def __init__(self) -> None:
        self._broken: set[int] = set()

    @property
    def broken(self) -> bool:
        return sys.stderr is None or id(sys.stderr) in self._broken  # None: started with stderr closed (2>&-)

    def _attempt(self, action: Callable[[], Any]) -> None:
        if not self.broken:
            try:
                action()
            except (OSError, ValueError):  # ValueError: the stream was closed
                self._broken.add(id(sys.stderr))

    def write(self, text: str) -> int:
        self._attempt(lambda: sys.stderr.write(text))
        return len(text)

    def flush(self) -> None:
        self._attempt(lambda: sys.stderr.flush())  # looked up when attempted: sys.stderr may be None

    def isatty(self) -> bool:
        return not self.broken and sys.stderr.isatty()

    def __getattr__(self, name: str) -> Any:
        return getattr(sys.stderr if sys.stderr is not None else io.StringIO(), name)


class ClosedStdout(io.TextIOBase):
    """sys.stdout for a process started without one (`>&-`): writing fails as writing a closed descriptor does,
    so that `--version` or `--help` that nobody can read is an error (Python's None stdout drops it silently)."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))


err = Console(file=cast(IO[str], ForgivingStream()))  # duck-typed: write, flush, isatty and the rest from stderr


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str = "", *args: Any,
                      **kwargs: Any) -> None:
    """pnp-trt's own warnings (e.g. a cache that cannot be written) as one line, like errors; a library's are
    dropped, being about its internals (how diffusers calls huggingface_hub), nothing a user can act on."""
    if Path(__file__).parent not in Path(filename).parents:
        return
    err.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def user_errors(command: Callable[..., None]) -> Callable[..., None]:
    """Print a `PnPError` as one line and exit 2; never a traceback for a user mistake."""
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_warning
                command(*args, **kwargs)
        except PnPError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except Exception as exc:  # an OSError, or a library's own error carrying one (safetensors: a full disk)
            problem = file_system_problem(exc)
            if problem is None:
                raise
            err.print(f"[bold red]error:[/] {escape(problem)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as exc:
            STOP_SAID.append(True)
            written = written_before(exc)
            err.print(f"interrupted; {written} had been written in full" if written else
                      "interrupted; nothing was written", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code if isinstance(exc, Terminated) else 130) from None
    return wrapper


FILE_SYSTEM_REFUSALS = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space",
                        errno.ENAMETOOLONG: "choose a shorter name", errno.EROFS: "choose a writable place",
                        errno.EACCES: "check its permissions", errno.EPERM: "check its permissions"}
"""File-system refusals a user fixes (the fix named); pnp-trt's staging leaves nothing behind in each case."""


def file_system_problem(exc: BaseException) -> str | None:
    """The one line for a file-system refusal, or None for any other error (a bug: shown as one)."""
    number = getattr(exc, "errno", None)
    if number is None and "No space left on device" in str(exc):
        number = errno.ENOSPC
    if number not in FILE_SYSTEM_REFUSALS:
        return None
    where = f": {getattr(exc, 'filename', None)!s:.120}" if getattr(exc, "filename", None) else ""
    return f"{os.strerror(number)}{where}; {FILE_SYSTEM_REFUSALS[number]}"


def path_text(value: str) -> Path:
    """A path flag's text: empty would silently mean the current directory."""
    if not value:
        raise typer.BadParameter("is empty; give a path")
    return Path(value)


def whole_number(text: str) -> int:
    """An integer flag's text: ASCII digits only (Python's int() also takes "1_0", " 5" and other scripts' digits)."""
    try:
        return int(validation.number_text(int, text))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a whole number (digits, e.g. 50)") from None


def real_number(text: str) -> float:
    """A number flag's text, by the same rule as form fields."""
    try:
        return float(validation.number_text(float, text))
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a number (e.g. 7.5)") from None


def refuse_unused(ctx: typer.Context, rules: dict[str, tuple[bool, str]]) -> None:
    """A flag given on the command line that does nothing in this run is refused, saying when it applies:
    `rules` maps a parameter name to (whether it applies now, when it does)."""
    for name, (applies, when) in rules.items():
        source = ctx.get_parameter_source(name)
        if not applies and source is not None and source.name == "COMMANDLINE":
            raise PnPError(f"--{name.replace('_', '-')} applies {when}; leave it out")


def check_positive(flags: dict[str, float]) -> None:
    """Sizes, counts and durations given as flags must be finite and above zero."""
    for name, value in flags.items():
        if not (math.isfinite(value) and value > 0):
            raise PnPError(f"{name} must be a finite positive number, got {value}")


MIN_UPLOAD_MB = 0.1
"""The smallest --max-upload-mb a server starts with: a 64×64 PNG of noise takes 12 KiB, and the limit bounds
every form field (prompts too)."""


def check_upload_limit(max_upload_mb: float) -> None:
    if not max_upload_mb >= MIN_UPLOAD_MB:  # NaN too
        raise PnPError(f"--max-upload-mb {max_upload_mb:g} would refuse nearly every request (a 64x64 PNG can take "
                       f"12 KiB, and prompts are form fields too); give at least {MIN_UPLOAD_MB}")


def optional(flag: str, value: float | None) -> dict[str, float]:
    """A flag's value for `check_positive`, if it was given (None: the model's default applies)."""
    return {} if value is None else {flag: value}


def check_pixel_limit(max_mpx: float | None, flag: str) -> None:
    """A pixel limit must admit the smallest image there is (MIN_SIDE × MIN_SIDE)."""
    from .images import MIN_SIDE

    smallest = MIN_SIDE * MIN_SIDE / 1e6
    if max_mpx is not None and math.isfinite(max_mpx) and 0 < max_mpx < smallest:
        raise PnPError(f"{flag} {max_mpx:g} refuses every image (the smallest, {MIN_SIDE}x{MIN_SIDE}, is "
                       f"{smallest:.4f} Mpx); give at least {smallest:.4f}")


PRESET_HELP = ("Where PnP injects: pnp (the default: the paper's layers, or DESIGN 1b's for SDXL) | "
               "pnp-first-attention (also the first attention of the first injected stage). Default: the model's.")
THREADS_HELP = ("Threads per ONNX Runtime graph, or torch's intra-op threads (default: one per core; the same "
                "as PNP_TRT_THREADS=N).")


def set_threads(threads: int | None) -> None:
    """`--threads`, bounded as the variable it sets is (checked now, before any work)."""
    from .runtime.onnxruntime_sessions import MAX_THREADS, THREADS_VARIABLE, intra_op_threads

    if threads is not None:
        os.environ[THREADS_VARIABLE] = str(validation.integer("--threads", threads, 1, MAX_THREADS))
    intra_op_threads()


def rich_progress(progress: Progress) -> Callable[[str, int], Callable[[], None]]:
    """Bars on a terminal; elsewhere (a log, CI, a pipe) one plain line per finished stage."""
    if not progress.disable:
        def start(stage: str, total: int) -> Callable[[], None]:
            task = progress.add_task(stage, total=total)
            return lambda: progress.advance(task)
        return start
    return plain_progress


def plain_progress(stage: str, total: int) -> Callable[[], None]:
    started, done = time.monotonic(), 0

    def advance() -> None:
        nonlocal done
        done += 1
        if done == total:
            err.print(f"{stage}: {total}/{total} in {time.monotonic() - started:.1f}s", highlight=False)
    return advance


def announce(progress: Progress, task: TaskID, graph: str, **update: Any) -> None:
    """A graph's long step beginning: the bar's label on a terminal, a plain line elsewhere."""
    progress.update(task, description=graph, **update)
    if progress.disable:
        err.print(f"working on {graph}…", highlight=False)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description:>9}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=False, disable=not err.is_terminal)


@app.command()
@user_errors
def translate(
    ctx: typer.Context,
    image: str | None = typer.Argument(None, help="Guidance image (PNG/JPEG/...). Omit with --source-prompt."),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="Target prompt; repeat for several."),
    out: str = typer.Option(..., "--out", "-o", help="Output .png (one prompt) or directory (several). An existing "
                             "one is replaced only if pnp-trt wrote it (see --overwrite)."),
    overwrite: bool = typer.Option(False, help="With one prompt: replace an existing --out file pnp-trt did not "
                                   "write (never the guidance image, a link, a device or a FIFO)."),
    model: str | None = typer.Option(None, help="Hub id or diffusers directory (torch backend; default "
                                                   "stabilityai/stable-diffusion-2-1-base)."),
    backend: str = typer.Option("torch", help="torch | onnxruntime | tensorrt."),
    engines: Path | None = typer.Option(None, help="Exported/built directory (onnxruntime, tensorrt).",
                                              parser=path_text),
    provider: str = typer.Option("cpu", help="onnxruntime execution provider: cpu | cuda | tensorrt "
                                             "(cuda/tensorrt need onnxruntime-gpu)."),
    steps: int = typer.Option(SETTINGS.steps, help="Sampling steps.", parser=whole_number),
    inversion_steps: int | None = typer.Option(None, help="DDIM inversion steps (default: --steps; "
                                                             "the paper's preprocessing uses 999).",
                                                             parser=whole_number),
    inversion_prompt: str = typer.Option(SETTINGS.inversion_prompt, help="Prompt used to invert the guidance image."),
    guidance_scale: float = typer.Option(SETTINGS.guidance_scale, help="Classifier-free guidance scale.",
                                                                  parser=real_number),
    negative_prompt: str = typer.Option(SETTINGS.negative_prompt, help="Negative prompt."),
    feature_injection: float = typer.Option(SETTINGS.feature_injection,
                                            help="τ_f: fraction of steps injecting the ResBlock feature.",
                                            parser=real_number),
    attention_injection: float = typer.Option(SETTINGS.attention_injection,
                                              help="τ_A: fraction of steps injecting self-attention q/k.",
                                              parser=real_number),
    seed: int = typer.Option(SETTINGS.seed, help="Seed of the noise a generated guidance starts from.",
                                            parser=whole_number),
    height: int | None = typer.Option(None, help="Output height, a multiple of 64 (SDXL: 32) (default: keep the "
                                                    "aspect ratio, short side the model's native size: 512 "
                                                    "for SD 2.1-base, 1024 for SDXL, 128 for the demo model). "
                                                    "With --width too, the guidance is resized to exactly that size "
                                                    "(stretched if its aspect ratio differs).", parser=whole_number),
    width: int | None = typer.Option(None, help="Output width (multiple of 64; SDXL: 32); see --height.",
                                     parser=whole_number),
    source_prompt: str | None = typer.Option(None, help="Generate the guidance from this prompt instead of "
                                                           "an IMAGE."),
    source_guidance_scale: float = typer.Option(SETTINGS.source_guidance_scale,
                                                help="Guidance scale for --source-prompt generation.",
                                                parser=real_number),
    prompt_batch_size: int | None = typer.Option(None, help="Target prompts per injection batch (default: from "
                                                            "free GPU memory; 4 on the CPU).", parser=whole_number),
    cache_dir: Path | None = typer.Option(None, help="Keep inverted latents + captured features here (safetensors) "
                                                     "and reuse them for later prompts on the same image/settings.",
                                                     parser=path_text),
    max_output_mpx: float | None = typer.Option(None, help="Largest output in megapixels (default: 1024² = 1.05, "
                                                "or (1.5 × the model's native side)² where more: SDXL 1536² = "
                                                "2.36). Memory grows fast with size: see the README.",
                                                parser=real_number),
    save_guidance: bool = typer.Option(False, help="With --source-prompt: also write the generated guidance "
                                                   "(guidance.png in the --out directory; with one prompt "
                                                   "NAME.guidance.png beside --out)."),
    cache_dir_gib: float = typer.Option(DEFAULT_DISK_CACHE_BYTES / 2**30, help="Most GiB --cache-dir may hold; the "
                                        "least recently used sources are deleted beyond it.", parser=real_number),
    cuda_graphs: bool = typer.Option(True, help="On CUDA, replay the UNet as CUDA graphs (captured once per "
                                                "shape; the torch, onnxruntime-cuda and tensorrt backends)."),
    threads: int | None = typer.Option(None, help=THREADS_HELP, parser=whole_number),
    injection_preset: str | None = typer.Option(None, help=PRESET_HELP),
) -> None:
    """Translate a guidance image (or a generated one) into each --prompt, keeping its layout."""
    from .config import check_backend
    from .images import check_guidance

    if (image is None) == (source_prompt is None):
        raise PnPError("give a guidance IMAGE or --source-prompt TEXT (exactly one)")
    if save_guidance and source_prompt is None:
        raise PnPError("--save-guidance saves a guidance generated from --source-prompt; an IMAGE is already saved")
    check_backend(backend)
    refuse_unused(ctx, {"provider": (backend == "onnxruntime", "to --backend onnxruntime"),
                        "cache_dir_gib": (cache_dir is not None, "with --cache-dir"),
                        **{name: (source_prompt is not None, "with --source-prompt (an IMAGE's inversion has "
                                                             "no noise to seed)") for name in GENERATION_SETTINGS}})
    validation.prompts(prompt)
    set_threads(threads)
    config = TranslateConfig(steps=steps, inversion_steps=inversion_steps, inversion_prompt=inversion_prompt,
                             guidance_scale=guidance_scale, negative_prompt=negative_prompt,
                             feature_injection=feature_injection, attention_injection=attention_injection,
                             seed=seed, height=height, width=width, source_guidance_scale=source_guidance_scale,
                             prompt_batch_size=prompt_batch_size)
    check_positive({"--cache-dir-gib": cache_dir_gib, **optional("--max-output-mpx", max_output_mpx)})
    check_pixel_limit(max_output_mpx, "--max-output-mpx")
    validation.number("--cache-dir-gib", cache_dir_gib, 0, 2**30)  # the API's bound, in the flag's own unit
    limits = Limits(max_output_pixels=None if max_output_mpx is None else int(max_output_mpx * 1e6),
                    over_hint=CLI_OVER_HINT)
    if cache_dir is not None:
        check_cache_placement(cache_dir, out, engines)
    companions = [guidance_beside(Path(out))] if save_guidance and len(prompt) == 1 else []
    check_destination(out, len(prompt) > 1, overwrite, [image] if image else [], companions)  # text: a final /
    guidance = check_guidance(image) if image is not None else None  # before the model's slow load
    from .runtime.cache import SourceCache
    from .runtime.loading import open_model
    from .runtime.translator import Translator

    if backend == "torch":
        require("torch", "the torch backend")
        from .models import quiet_loading
        quiet_loading()
    cache = SourceCache(directory=cache_dir, disk_budget_bytes=int(cache_dir_gib * 2**30)) if cache_dir else None
    translator = Translator(open_model(backend, model, engines, provider, cuda_graphs, injection_preset), cache,
                            limits)
    with _progress() as progress:
        result = translator.translate(prompt, guidance, source_prompt, rich_progress(progress),
                                      decode_guidance=save_guidance, **config.to_dict())
    paired = guidance_beside(Path(out))
    had_pair = len(prompt) == 1 and paired.exists()
    written = result.write(Path(out), overwrite)
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.stats.timings.items())
    total = sum(result.stats.timings.values())
    cached = "; source from cache" if result.source_cache_hit else ""
    retired = f"; removed {paired.name}, the guidance of the result replaced" if had_pair and not paired.exists() \
        else ""
    err.print(f"wrote {len(written)} image(s) to {out} in {total:.2f}s ({stages}); "
              f"{result.stats.unet_evaluations} UNet evaluations{cached}{retired}", highlight=False, soft_wrap=True)


def check_cache_placement(cache_dir: Path, out: str | Path, engines: Path | None) -> None:
    """The cache keeps a directory of its own: not inside this run's --out (nor where every surface refuses it)."""
    if Path(cache_dir).resolve().is_relative_to(Path(out).resolve()):
        raise PnPError(f"--cache-dir {cache_dir} is inside --out {out} (or is it); keep the cache in a directory of "
                       "its own")
    check_cache_home(cache_dir, engines)


@app.command()
@user_errors
def export(
    model: str = typer.Option("stabilityai/stable-diffusion-2-1-base", help="Hub id or diffusers directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory to create (must not exist).", parser=path_text),
    precision: str = typer.Option("fp32", help="fp32 | fp16 (mixed: norms, softmax, timestep embedding fp32)."),
    opset: int | None = typer.Option(None, help="ONNX opset (default 17; 23 with --attention onnx).",
                                           parser=whole_number),
    attention: str = typer.Option("standard", help="standard: plain ONNX ops, for every backend (TensorRT fuses "
                                  "them itself) | onnx: one ONNX Attention node (opset 23) per layer, fused by "
                                  "ONNX Runtime and by TensorRT ≥ 10.14 | onnxruntime: ONNX Runtime's fused "
                                  "attention, not loadable by TensorRT."),
    injection_preset: str | None = typer.Option(None, help=PRESET_HELP + " The graphs carry it."),
) -> None:
    """Export text encoder, VAE encoder/decoder and the PnP UNet to ONNX, validated against PyTorch."""
    require("torch", "pnp-trt export")
    from .contract import TOLERANCE
    from .export.exporter import export_model
    from .models import quiet_loading

    quiet_loading()
    with _progress() as progress:
        task = progress.add_task("export", total=4)
        reports = export_model(model, out, precision, opset, attention,
                               on_graph=lambda name: announce(progress, task, name),
                               versions=versions(), injection_preset=injection_preset)
        progress.update(task, completed=4)
    err.print(f"error of each output against PyTorch, relative to its magnitude (tolerance "
              f"{TOLERANCE[precision]:.0e}):", highlight=False)
    for report in reports:
        errors = "  ".join(f"{name} {error:.1e}" for name, error in report.errors.items())
        err.print(f"  {report.name}: {errors}", highlight=False, soft_wrap=True)
    err.print(f"exported {model} ({precision}, {attention} attention) to {out}", highlight=False)


@app.command()
@user_errors
def build(
    directory: Path = typer.Argument(..., help="An exported directory (pnp-trt export); engines are added to it.",
                                          parser=path_text),
    opt_batch: int = typer.Option(1, help="Prompt batch (prompts per injection batch) to optimize for; every "
                                          "engine also takes batch 1.", parser=whole_number),
    max_batch: int = typer.Option(4, help="Largest prompt batch (the UNet engine takes 2x this).", parser=whole_number),
    min_size: str | None = typer.Option(None, help="Smallest image HEIGHTxWIDTH (default: half the model's native "
                                        "side: 256x256 for SD 2.1-base, 512x512 for SDXL)."),
    opt_size: str | None = typer.Option(None, help="Image size to optimize for (default: the model's native "
                                        "square: 512x512, SDXL 1024x1024)."),
    max_size: str | None = typer.Option(None, help="Largest image HEIGHTxWIDTH (default: 1.5x the native side: "
                                        "768x768, SDXL 1536x1536)."),
    static: str | None = typer.Option(None, help="HEIGHTxWIDTH: one fixed size and --opt-batch (fastest)."),
    timing_cache: Path | None = typer.Option(None, help="Timing cache file, read and updated (faster rebuilds).",
                                                   parser=path_text),
    optimization_level: int = typer.Option(3, help="TensorRT builder optimization level 0-5.", parser=whole_number),
) -> None:
    """Compile the exported graphs to TensorRT engines (needs a CUDA GPU and TensorRT 10.x/11.x)."""
    from .contract import ModelDims
    from .engines.availability import require_tensorrt
    from .engines.profiles import BuildShapes, parse_size
    from .manifest import GRAPHS, read_manifest_for_tensorrt

    manifest = read_manifest_for_tensorrt(directory)
    if static:
        shapes = BuildShapes.static(parse_size(static), opt_batch)
    else:
        dims = ModelDims.from_dict(manifest["dims"])
        default = BuildShapes.around(dims.native_size, dims.size_multiple, opt_batch, max_batch)
        shapes = BuildShapes(opt_batch, max_batch, *(parse_size(given) if given else fallback for given, fallback
                                                     in ((min_size, default.min_size), (opt_size, default.opt_size),
                                                         (max_size, default.max_size))))
    require_tensorrt("pnp-trt build")
    from .engines.build import build_all

    with _progress() as progress:
        graph_task = progress.add_task("engines", total=len(GRAPHS))
        phase_task = progress.add_task("", total=None)

        def on_graph(graph: str) -> None:
            announce(progress, graph_task, graph, completed=GRAPHS.index(graph))

        def on_step(phase: str, step: int, total: int) -> None:
            progress.update(phase_task, description=phase[:24], completed=step, total=total)

        entries = build_all(directory, shapes, optimization_level, timing_cache, on_graph, on_step)
        progress.update(graph_task, completed=4)
    platform = next(iter(entries.values())).platform
    err.print(f"built {len(entries)} engines in {directory} for {platform.gpu} (TensorRT {platform.tensorrt})")
    from .engines.fusion import fusion_report
    for line in fusion_report(directory, ["unet", "vae_encoder", "vae_decoder"]):  # *.layers.json: per layer
        err.print(f"  {line}", highlight=False)


@app.command()
@user_errors
def verify(directory: Path = typer.Argument(..., help="An exported directory.", parser=path_text)) -> None:
    """Check an exported directory as loading does (manifest, tokenizers, scheduler, each graph's identity), then
    every file against the sha256 in its manifest."""
    from .manifest import read_manifest, rebuild_hint
    from .runtime.exported import verify_exported

    bad = verify_exported(directory)
    if bad:
        raise PnPError(f"{', '.join(bad)} in {directory} differ from the manifest (corrupt or replaced); "
                       f"rebuild with `{rebuild_hint(read_manifest(directory), directory)}`")
    err.print(f"{directory}: all {len(read_manifest(directory)['files'])} files match their sha256")


@app.command("make-tiny-model")
@user_errors
def make_tiny_model(
    directory: Path = typer.Argument(..., help="Where to write the model (must not exist, or hold this very "
                                                "model: then it is reused).", parser=path_text),
    seed: int = typer.Option(0, help="Seed of the random weights.", parser=whole_number),
    full_size: bool = typer.Option(False, help="Full widths: SD 2.1-base (~5 GB) or SDXL-base (~14 GB); honest "
                                   "speed tests offline."),
    family: str = typer.Option("sd", help="sd: the SD 2.1 topology | sdxl: the SDXL-base topology (two text "
                               "encoders, three UNet levels)."),
) -> None:
    """Write a random-weight model with the SD 2.1 (or SDXL) topology and tiny widths (offline demos and tests)."""
    require("torch", "pnp-trt make-tiny-model")
    from .models import quiet_loading
    from .random_models import made_with
    from .random_models import make_tiny_model as make

    validation.integer("--seed", seed, 0, 2**32 - 1)
    from .families import FAMILIES
    validation.one_of("--family", family, list(FAMILIES))
    if made_with(directory, seed, full_size, family):
        err.print(f"{directory} already holds this model (seed {seed}); reusing it")
        return
    if directory.exists():
        raise PnPError(f"{directory} already exists and is not a model made with these settings; "
                       "choose a new directory")
    if not directory.parent.is_dir():
        raise PnPError(f"cannot write {directory}: directory {directory.parent} does not exist")
    quiet_loading()
    make(directory, seed, full_size, family)
    kind = "full-size" if full_size else "tiny"
    err.print(f"wrote a {kind} random-weight {'SDXL' if family == 'sdxl' else 'SD 2.1'}-topology model to "
              f"{directory}")


@app.command("make-demo-model")
@user_errors
def make_demo_model(
    directory: Path = typer.Argument(..., help="Where to write the model (must not exist, or hold the demo model: "
                                               "then it is reused).", parser=path_text),
) -> None:
    """Write the demo model: the SD 2.1 topology at small widths, trained on pictures of coloured shapes
    (128×128; prompts like "a red circle on a blue background"), so PnP's edits show offline."""
    from .demo import make_demo_model as make

    made = make(directory)
    err.print(f"wrote the demo model to {directory}" if made else f"{directory} already holds the demo model; "
              "reusing it")


@app.command()
@user_errors
def serve(
    ctx: typer.Context,
    backend: str = typer.Option("onnxruntime", help="torch | onnxruntime | tensorrt."),
    model: str | None = typer.Option(None, help="Hub id or diffusers directory (torch backend)."),
    engines: Path | None = typer.Option(None, help="Exported/built directory (onnxruntime, tensorrt).",
                                              parser=path_text),
    provider: str = typer.Option("cpu", help="onnxruntime execution provider: cpu | cuda | tensorrt."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="TCP port.", parser=whole_number),
    cache_dir: Path | None = typer.Option(None, help="Keep sources on disk too (see translate --cache-dir).",
                                                parser=path_text),
    cuda_graphs: bool = typer.Option(True, help="On CUDA, replay the UNet as CUDA graphs."),
    max_upload_mb: float = typer.Option(SERVE.max_upload_mb, help="Largest image upload, MiB (413 beyond).",
                                                             parser=real_number),
    max_input_mpx: float = typer.Option(SERVE.max_input_mpx, help="Largest guidance image, megapixels (413 "
                                                                   "beyond).", parser=real_number),
    max_output_mpx: float | None = typer.Option(None, help="Largest output, megapixels (422 beyond; default: "
                                                "1.05, SDXL 2.36, as translate's).",
                                                               parser=real_number),
    max_prompts: int = typer.Option(SERVE.max_prompts, help="Prompts per request (422 beyond).", parser=whole_number),
    max_steps: int = typer.Option(SERVE.max_steps, help="Sampling or inversion steps per request (422 beyond).",
                                                   parser=whole_number),
    queue: int = typer.Option(SERVE.queue, help="Requests waiting or running at once (429 with Retry-After "
                                                "beyond).", parser=whole_number),
    deadline_s: float = typer.Option(SERVE.deadline_s, help="Seconds before an unanswered request gets 504.",
                                                       parser=real_number),
    coalesce_ms: float = typer.Option(SERVE.coalesce_ms, help="Window in which requests on the same image and "
                                                              "settings join one translation (one capture, one "
                                                              "injection batch).", parser=real_number),
    workers: int = typer.Option(SERVE.workers, help="Translations run at once (1 suits one GPU: its calls queue "
                                                    "anyway).", parser=whole_number),
    threads: int | None = typer.Option(None, help=THREADS_HELP, parser=whole_number),
    injection_preset: str | None = typer.Option(None, help=PRESET_HELP + " Torch backend; an export carries its own."),
    use_ray: bool = typer.Option(False, "--ray", help="Serve on Ray Serve (replicas across GPUs and nodes)."),
    replicas: int = typer.Option(SERVE.replicas, help="With --ray: model replicas (each loads the model).",
                                                 parser=whole_number),
    gpus_per_replica: float = typer.Option(SERVE.gpus_per_replica, help="With --ray: GPUs each replica reserves "
                                                                        "(1 on GPU nodes).", parser=real_number),
) -> None:
    """Serve translations over HTTP: POST /v1/translate, GET /healthz, /metrics, / (a page to try it), /docs."""
    from .config import check_backend

    check_backend(backend)
    refuse_unused(ctx, {"provider": (backend == "onnxruntime", "to --backend onnxruntime"),
                        "replicas": (use_ray, "with --ray"), "gpus_per_replica": (use_ray, "with --ray")})
    from .runtime.loading import check_source
    check_source(backend, model, engines, provider)
    validation.integer("--port", port, 1, 65535)
    set_threads(threads)
    validation.number("--coalesce-ms", coalesce_ms, 0, 60_000)
    validation.number("--deadline-s", deadline_s, 0, 86_400)  # a day: longer is no deadline at all
    check_pixel_limit(max_input_mpx, "--max-input-mpx")
    check_upload_limit(max_upload_mb)
    check_pixel_limit(max_output_mpx, "--max-output-mpx")
    check_positive({"--max-upload-mb": max_upload_mb, "--max-input-mpx": max_input_mpx,
                    **optional("--max-output-mpx", max_output_mpx), "--deadline-s": deadline_s,
                    "--max-prompts": max_prompts,
                    "--max-steps": max_steps, "--queue": queue, "--workers": workers, "--replicas": replicas})
    if cache_dir is not None:
        check_cache_home(cache_dir, engines)
    require("serve", "pnp-trt serve")
    import uvicorn

    from .serve.app import create_app
    options = ServeOptions(backend=backend, model=model, engines=str(engines) if engines else None,
                           provider=provider, cuda_graphs=cuda_graphs, injection_preset=injection_preset,
                           cache_dir=str(cache_dir) if cache_dir else None,
                           replicas=replicas, gpus_per_replica=gpus_per_replica, coalesce_ms=coalesce_ms,
                           workers=workers, max_upload_mb=max_upload_mb, max_input_mpx=max_input_mpx,
                           max_output_mpx=max_output_mpx, max_prompts=max_prompts, max_steps=max_steps, queue=queue,
                           deadline_s=deadline_s)
    if backend != "torch":  # before the server starts: a missing or broken export is one line, not a 503 later
        from .manifest import read_manifest
        if engines is None:
            raise PnPError(f"--backend {backend} serves an exported directory: pass --engines DIR")
        read_manifest(engines)
    check_listening(host, port)
    if use_ray:
        _serve_on_ray(options, host, port)
        return
    application = create_app(options.load, options.limits(), coalesce_ms, workers)
    err.print(f"serving {backend} on {url(host, port)} (docs at /docs; Ctrl-C stops)", highlight=False)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM; SIGHUP (a closed terminal) is made to mean the same
    signal.signal(signal.SIGHUP, lambda signum, frame: signal.raise_signal(signal.SIGTERM))
    uvicorn.run(application, host=host, port=port, log_level="info")  # one access line per request


@app.command("triton-repo")
@user_errors
def triton_repo(
    out: Path = typer.Argument(..., help="Triton model repository (an existing directory; other models there "
                                         "stay as they are).", parser=path_text),
    engines: Path | None = typer.Option(None, help="Exported/built directory (onnxruntime, tensorrt).",
                                              parser=path_text),
    backend: str = typer.Option("onnxruntime", help="torch | onnxruntime | tensorrt."),
    model: str | None = typer.Option(None, help="Hub id or diffusers directory (torch backend)."),
    provider: str = typer.Option("cpu", help="onnxruntime execution provider: cpu | cuda | tensorrt."),
    name: str = typer.Option("pnp_trt", help="Model name: the directory written inside OUT."),
    instances: int = typer.Option(1, help="Model instances (each loads the model): per GPU with --kind gpu.",
                                     parser=whole_number),
    kind: str = typer.Option("auto", help="auto | cpu | gpu: Triton's instance kind (auto: gpu for tensorrt, "
                                          "the cuda/tensorrt providers and torch on a CUDA machine)."),
    cache_dir: Path | None = typer.Option(None, help="Keep sources on disk too (see translate --cache-dir).",
                                                parser=path_text),
    cuda_graphs: bool = typer.Option(True, help="On CUDA, replay the UNet as CUDA graphs."),
    max_batch_size: int = typer.Option(8, help="Requests Triton's dynamic batcher hands over at once; those on "
                                               "the same guidance and settings run as one translation.",
                                               parser=whole_number),
    queue_delay_ms: float = typer.Option(10.0, help="How long the batcher waits to fill a batch.", parser=real_number),
    max_upload_mb: float = typer.Option(SERVE.max_upload_mb, help="Largest IMAGE, MiB.", parser=real_number),
    max_input_mpx: float = typer.Option(SERVE.max_input_mpx, help="Largest guidance image, megapixels.",
                                                             parser=real_number),
    max_output_mpx: float | None = typer.Option(None, help="Largest output, megapixels (default: as translate's).",
                                                parser=real_number),
    max_prompts: int = typer.Option(SERVE.max_prompts, help="Prompts per request.", parser=whole_number),
    max_steps: int = typer.Option(SERVE.max_steps, help="Sampling or inversion steps per request.",
                                                   parser=whole_number),
) -> None:
    """Write a Triton Inference Server model (Python backend) serving pnp-trt: OUT/NAME/config.pbtxt and
    OUT/NAME/1/model.py. Inputs IMAGE or SOURCE_PROMPT, PROMPT, optional settings; outputs IMAGES, RECORD."""
    from .runtime.loading import check_source
    from .serve.triton_repo import write_repository

    check_source(backend, model, engines, provider)
    validation.one_of("--kind", kind, ("auto", "cpu", "gpu"))
    for flag, value, top in (("--instances", instances, 64), ("--max-batch-size", max_batch_size, 1024)):
        validation.integer(flag, value, 1, top)
    validation.number("--queue-delay-ms", queue_delay_ms, 0, 60_000)
    check_pixel_limit(max_input_mpx, "--max-input-mpx")
    check_upload_limit(max_upload_mb)
    check_pixel_limit(max_output_mpx, "--max-output-mpx")
    check_positive({"--max-upload-mb": max_upload_mb, "--max-input-mpx": max_input_mpx,
                    **optional("--max-output-mpx", max_output_mpx), "--max-prompts": max_prompts,
                    "--max-steps": max_steps})
    if backend != "torch":
        from .manifest import read_manifest
        if engines is None:
            raise PnPError(f"--backend {backend} serves an exported directory: pass --engines DIR")
        read_manifest(engines)  # a broken export is one line now, not a model that never gets ready
    if cache_dir is not None:
        check_cache_home(cache_dir, engines)
    options = ServeOptions(backend=backend, model=model, engines=str(engines.resolve()) if engines else None,
                           provider=provider, cuda_graphs=cuda_graphs,
                           cache_dir=str(cache_dir.resolve()) if cache_dir else None, max_upload_mb=max_upload_mb,
                           max_input_mpx=max_input_mpx, max_output_mpx=max_output_mpx, max_prompts=max_prompts,
                           max_steps=max_steps)
    gpu = kind == "gpu" or (kind == "auto" and _wants_gpu(backend, provider))
    target = write_repository(out, name, options, instances, gpu, max_batch_size, int(queue_delay_ms * 1000))
    err.print(f"wrote Triton model {name} to {target} ({instances} {'GPU' if gpu else 'CPU'} instance(s), "
              f"{backend}); start Triton with --model-repository {out}", highlight=False, soft_wrap=True)


def _wants_gpu(backend: str, provider: str) -> bool:
    if backend == "tensorrt" or (backend == "onnxruntime" and provider != "cpu"):
        return True
    if backend != "torch":
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def check_listening(host: str, port: int) -> None:
    """The address can be listened on (not taken, a real address): one line now, not the server's own
    traceback after the model has loaded."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:  # socket.gaierror too
        raise PnPError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port or --host")\
            from None


def _serve_on_ray(options: Any, host: str, port: int) -> None:
    """The same app on Ray Serve (a local Ray unless RAY_ADDRESS names a cluster), until interrupted."""
    require("ray", "--ray")
    import ray
    from ray import serve

    from .serve.ray_app import build_application

    ray.init(logging_level=logging.ERROR, log_to_driver=False)
    _handle_stop_signals()  # ray.init installs a native handler that dumps a stack trace on SIGTERM
    try:
        _check_ray_gpus(ray.cluster_resources().get("GPU", 0), options.replicas, options.gpus_per_replica)
        serve.start(http_options={"host": host, "port": port})
        err.print(f"serving {options.backend} on Ray Serve, {options.replicas} replica(s), {url(host, port)} "
                  "(Ctrl-C stops)", highlight=False)
        serve.run(build_application(options), blocking=True)
    except KeyboardInterrupt as exc:  # Ctrl-C, SIGTERM, SIGHUP: a local Ray goes down with the command
        STOP_SAID.append(True)
        err.print("stopped serving", highlight=False)
        raise typer.Exit(exc.exit_code if isinstance(exc, Terminated) else 130) from None
    finally:
        ray.shutdown()


def _check_ray_gpus(cluster_gpus: float, replicas: int, per_replica: float) -> None:
    """Replicas that reserve more GPUs than the Ray cluster has are never placed (they wait, "loading", forever):
    refused before serving."""
    if per_replica * replicas > cluster_gpus:
        raise PnPError(f"--replicas {replicas} × --gpus-per-replica {per_replica:g} need {per_replica * replicas:g} "
                       f"GPUs, and the Ray cluster has {cluster_gpus:g}; lower them (0 runs on CPUs) or start Ray "
                       "where the GPUs are")


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled like Ctrl-C: every staging file and directory is cleaned up on the way out;
    the exit code is the shell's for that signal (128 + its number)."""

    def __init__(self, signum: int):
        super().__init__()
        self.exit_code = 128 + signum



STREAM_ERRNOS = (errno.ENOSPC, errno.EPIPE, errno.EIO, errno.EBADF, errno.EDQUOT)
"""What writing a standard stream can fail with (full, closed, broken)."""
STOPPED_BY: list[int] = []
"""The stop signal received, if one was: the exit code where the parser turned it into a plain abort."""
STOP_SAID: list[bool] = []
"""Whether the command itself reported the stop (else `main` does, once the parser has given up)."""


def _stop(signum: int, frame: Any) -> None:
    """The first stop signal unwinds the command (cleaning up as it goes); later ones are ignored, so that a
    second Ctrl-C cannot cut the cleanup short or kill the process by signal."""
    if STOPPED_BY:  # the handler stays: SIG_IGN now would turn a signal received before this one was
        return  # handled into "OSError: Signal 15 ignored due to race condition" in the cleanup
    STOPPED_BY.append(signum)
    raise KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _print_version(value: bool) -> None:
    if value:
        print(f"pnp-trt {versions().get('pnp-trt', 'unknown')}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Plug-and-Play Diffusion Features image translation: PyTorch, ONNX Runtime, TensorRT."""


def _handle_stop_signals() -> None:
    """`_stop` for each stop signal (SIGHUP left ignored under `nohup`)."""
    for signum in STOP_SIGNALS:
        if not nohup(signum):
            signal.signal(signum, _stop)


def main() -> None:
    _handle_stop_signals()
    if sys.stdout is None:
        sys.stdout = ClosedStdout()
    parsing = _click_exceptions()
    try:
        code = app(prog_name="pnp-trt", standalone_mode=False)
    except parsing.NoArgsIsHelpError as exc:
        exc.show()
        code = 0
    except parsing.UsageError as exc:  # an unparsable or unknown flag: one line too, like every user error
        where = f"; see `{exc.ctx.command_path} -h`" if exc.ctx else ""
        err.print(f"[bold red]error:[/] {escape(exc.format_message())}{where}", highlight=False, soft_wrap=True)
        code = 2
    except (typer.Abort, KeyboardInterrupt):  # a stop signal before the command ran (the parser's abort, or
        code = 130  # the signal itself while typer builds the command): said and coded below
    except Exception as exc:  # not a user error: a bug, said in one line (PNP_TRT_DEBUG=1 shows the traceback)
        if isinstance(exc, OSError) and exc.errno in STREAM_ERRNOS:  # --help or --version: stdout full or closed
            err.print(f"[bold red]error:[/] cannot write to standard output ({escape(exc.strerror or str(exc))})",
                      highlight=False, soft_wrap=True)
            code = 1
        elif os.environ.get("PNP_TRT_DEBUG"):
            raise
        else:
            text = str(exc).splitlines()[0][:300] if str(exc) else ""
            err.print(f"[bold red]internal error:[/] {escape(type(exc).__name__)}: {escape(text)} — a pnp-trt bug; "
                      "rerun with PNP_TRT_DEBUG=1 for the traceback and report it", highlight=False, soft_wrap=True)
            code = 1
    if code == 130 and STOPPED_BY and not STOP_SAID:  # the parser took the signal (typer: 130 even for SIGTERM)
        err.print("interrupted; nothing was written", highlight=False, soft_wrap=True)
        code = 128 + STOPPED_BY[0]
    _quiet_broken_streams()
    sys.exit(code if isinstance(code, int) else 0)


def url(host: str, port: int) -> str:
    """The address a browser takes: an IPv6 host in brackets (http://[::1]:8000)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_as_program() -> None:
    """`main` as the whole life of a process (the console script, `python -m pnp_trt.cli`): once it is done, stop
    signals are ignored by the system, since Python's handlers end before its shutdown does. (Not in `main`
    itself: a caller in the same process, such as a test, keeps its Ctrl-C.)"""
    try:
        main()
    finally:
        ignore_stop_signals()


def _quiet_broken_streams() -> None:
    """A standard stream that cannot be flushed (a closed pipe) is pointed at /dev/null, so that Python's own
    flush at exit neither prints "Exception ignored" nor turns the exit code into 120."""
    for number, stream in ((1, sys.stdout), (2, sys.stderr)):
        if stream is None:  # closed when the process started: Python neither writes nor flushes it
            continue
        try:
            stream.flush()
        except (OSError, ValueError):
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), number)


def _click_exceptions() -> Any:
    """The parser's exception types: typer ≥ 0.20 vendors click as `typer._click`, older typer uses click."""
    for name in ("typer._click.exceptions", "click.exceptions"):
        with contextlib.suppress(ImportError):
            return importlib.import_module(name)
    raise ImportError("neither typer's click nor click is importable")


if __name__ == "__main__":
    run_as_program()
