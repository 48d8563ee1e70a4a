"""The ``sdlens`` command (also ``python -m sdlens``).

    sdlens demo --out DIR                        trace the shipped model, write figures + report
    sdlens trace "PROMPT" --out run.sdlens [--model ID_OR_PATH] [--seed] [--steps] [--cfg] ...
                 [--concepts circle,square,background] [--image-to-text]
    sdlens report run.sdlens --out report.html   one self-contained HTML file
    sdlens info run.sdlens                       what a trace holds (alias: inspect)

Errors (wrong arguments, a missing file, an unknown model or word) print one line and exit
with status 2, without a traceback.

Adding a command: write ``add_arguments(parser)`` and ``run(args) -> int`` and call
``register(name, help, add_arguments, run)``. ``sdlens sweep`` adds its own subparser
(:func:`sdlens.experiments.sweep.add_sweep_parser`, which sets ``func``); its errors print the
same one line.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sdlens.analysis.guidance import check_guidance_scale, guidance_text, prediction_label
from sdlens.analysis.tokens import encoders_sentence, token_view
from sdlens.engine.options import RECORDABLE, human_bytes
from sdlens.engine.session import check_seed, generate
from sdlens.experiments.sweep import add_sweep_parser, is_grid_file, sweep
from sdlens.pipeline import load_pipeline, recommended_settings
from sdlens.trace.compact import maps_nbytes
from sdlens.trace.core import load
from sdlens.version import __version__
from sdlens.views import plot
from sdlens.views.report import write_report

EXIT_USAGE = 2
DEMO_PROMPTS = ("a red circle and a blue square",)
_DTYPES = ("float32", "float16", "bfloat16")


class UsageError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]
    aliases: tuple[str, ...] = ()


COMMANDS: dict[str, Command] = {}


def register(name: str, help: str, add_arguments: Callable, run: Callable,
             aliases: tuple[str, ...] = ()) -> Command:
    """Register a subcommand (see the module docstring). Re-registering a name replaces it."""
    cmd = Command(name, help, add_arguments, run, tuple(aliases))
    COMMANDS[name] = cmd
    return cmd


def _log(args: argparse.Namespace, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _progress(args: argparse.Namespace, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=getattr(args, "quiet", False), file=sys.stderr,
                leave=False)


# --------------------------------------------------------------------------- shared options
def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="hub id or local diffusers folder (default: the shipped shapes model)")
    p.add_argument("--scheduler", default=None,
                   help="ddim, ddpm, pndm, euler, euler_a, lms, heun, dpm++, unipc "
                        "(default: the model's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if any)")
    p.add_argument("--dtype", default=None, choices=_DTYPES,
                   help="default float16 on cuda, else float32")


def _add_run_options(p: argparse.ArgumentParser, steps: int, cfg: float | None) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default {steps})")
    p.add_argument("--cfg", type=_cfg_value, default=cfg,
                   help="guidance scale (default: " + ("the model's" if cfg is None else f"{cfg:g}")
                   + "; <= 1 turns guidance off)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--height", type=int, default=None, help="image height in px")
    p.add_argument("--width", type=int, default=None, help="image width in px")
    p.add_argument("--heads", action="store_true", help="keep attention heads (bigger trace)")
    p.add_argument("--layers", default=None,
                   help="attention layers to keep: down, mid, up, a resolution (16), an alias "
                        "(up.1.0) or a comma-separated list (default: all)")


def _check_run_args(args: argparse.Namespace) -> None:
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {args.steps}")
    seeds = [("--seed", args.seed)] if getattr(args, "seed", None) is not None else []
    seeds += [("--grid-seeds", s) for s in getattr(args, "grid_seed_values", None) or []]
    for flag, seed in seeds:
        try:
            check_seed(seed, flag)
        except ValueError as e:
            raise UsageError(str(e).replace(f"{flag}=", f"{flag} ", 1)) from None
    for name in ("height", "width"):
        v = getattr(args, name, None)
        if v is not None and (v < 8 or v % 8):
            raise UsageError(f"--{name} must be a positive multiple of 8, got {v}")


def _load_pipe(args: argparse.Namespace):
    import torch

    _check_run_args(args)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return load_pipeline(args.model, device=args.device, dtype=dtype, scheduler=args.scheduler)


def _layers_arg(text: str | None) -> Any:
    if text is None:
        return None
    items: list[Any] = []
    for part in text.split(","):
        part = part.strip()
        if part:
            items.append(int(part) if part.isdigit() else part)
    return items[0] if len(items) == 1 else items


def _concepts_arg(text: str | None) -> list[str] | None:
    if text is None:
        return None
    concepts = [c.strip() for c in text.split(",") if c.strip()]
    if not concepts:
        raise UsageError(f"--concepts needs at least one concept, got {text!r}")
    return concepts


def _generate(pipe, args: argparse.Namespace, prompt: str, seed: int | None = None,
              cfg: float | None = None):
    # the model folder's recommended settings (the shipped MMDiT's) fill what was not given
    rec = recommended_settings(pipe)
    kwargs: dict[str, Any] = {k: v for k, v in rec.items()
                              if k not in ("guidance_scale", "num_inference_steps")}
    if cfg is None and args.cfg is None:
        cfg = rec.get("guidance_scale")
    concepts = _concepts_arg(getattr(args, "concepts", None))
    if concepts is not None:
        kwargs["concepts"] = concepts
    if getattr(args, "image_to_text", False):
        kwargs["record"] = (*RECORDABLE, "image_to_text")
    if args.heads:
        kwargs["heads"] = True
    layers = _layers_arg(args.layers)
    if layers is not None:
        kwargs["layers"] = layers
    return generate(pipe, prompt, seed=args.seed if seed is None else seed, steps=args.steps,
                    guidance_scale=args.cfg if cfg is None else cfg,
                    negative_prompt=args.negative, height=args.height, width=args.width, **kwargs)


def _trace_file(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise UsageError(f"no such trace file: {p}")
    if p.is_dir():
        raise UsageError(f"{p} is a folder, not a trace file")
    return p


def _load_trace(path: str):
    p = _trace_file(path)
    if is_grid_file(p):
        raise UsageError(f"{p} is a sweep grid file, not a trace; open it in Python with "
                         "sdlens.load(path) and grid.plot()")
    return load(p)


# --------------------------------------------------------------------------- trace
def _trace_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt (quote it)")
    p.add_argument("--out", "-o", required=True, help="trace file to write (e.g. run.sdlens)")
    _add_model_options(p)
    _add_run_options(p, steps=25, cfg=None)
    p.add_argument("--concepts", default=None,
                   help="comma-separated concepts to map (ConceptAttention; joint-attention "
                        "models), in the prompt or not, e.g. circle,square,background")
    p.add_argument("--image-to-text", action="store_true",
                   help="also record image->text maps (the words' attention to the image; "
                        "joint-attention models)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def _trace_run(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give a file name such as run.sdlens")
    _check_run_args(args)
    _concepts_arg(args.concepts)  # a bad list fails before the model loads
    _log(args, "loading the model ...")
    pipe = _load_pipe(args)
    t0 = time.time()
    with _progress(args, 1, "tracing") as bar:
        tr = _generate(pipe, args, args.prompt)
        bar.update()
    tr.save(out)
    _warn_truncated(tr)
    print(f"wrote {out}  ({human_bytes(out.stat().st_size)}, {len(tr.timesteps)} steps, "
          f"{time.time() - t0:.1f} s)")
    return 0


def _warn_truncated(tr) -> None:
    for words in tr.truncated_words:
        if words:
            print(f"warning: the text encoder's token limit cut: {' '.join(words)}", file=sys.stderr)


# --------------------------------------------------------------------------- report
def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="a trace file written by `sdlens trace` or trace.save()")
    p.add_argument("--out", "-o", default=None, help="HTML file (default: TRACE with .html)")
    p.add_argument("--batch", type=int, default=0, help="which image of the batch (default 0)")
    p.add_argument("--words", default=None, help="comma-separated words (default: all)")
    p.add_argument("--pooling", default="sdlens", choices=("sdlens", "daam"))
    p.add_argument("--quiet", "-q", action="store_true")


def _report_run(args: argparse.Namespace) -> int:
    tr = _load_trace(args.trace)
    out = Path(args.out).expanduser() if args.out else Path(args.trace).with_suffix(".html")
    words = [w.strip() for w in args.words.split(",") if w.strip()] if args.words else None
    with _progress(args, 1, "report") as bar:
        path = write_report(tr, out, batch=args.batch, words=words, pooling=args.pooling)
        bar.update()
    print(f"wrote {path}  ({human_bytes(path.stat().st_size)})")
    return 0


# --------------------------------------------------------------------------- info
def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="a trace file")


def describe_trace(tr, path: Path | None = None) -> str:
    """A plain-text summary of what a trace holds."""
    meta = tr.meta or {}
    lines = []
    if path is not None:
        lines.append(f"file         {path}  ({human_bytes(path.stat().st_size)})")
    lines += [
        f"model        {meta.get('model_id')}  (family {meta.get('family')}, task {meta.get('task')})",
        f"pipeline     {meta.get('pipeline_class')}",
        f"scheduler    {meta.get('scheduler_class')}, the model predicts {prediction_label(tr)}"
        f" ({tr.prediction_type})",
        f"steps        {len(tr.timesteps)}   {guidance_text(tr)}   seeds {meta.get('seeds')}",
        f"size         {meta.get('width')} x {meta.get('height')} px",
    ]
    for i, p in enumerate(tr.prompts):
        view = token_view(tr, i, attention=False)
        encoders = view.encoders()  # several text encoders (SD3): each one's count
        counts = ", ".join(f"{e['name']} {e['tokens']} of {e['limit']}" for e in encoders) \
            if encoders else f"{view.n_prompt_tokens} of {view.limit}"
        lines.append(f"prompt {i}     {p!r}  ({counts} tokens)")
        if encoders:
            lines.append(f"  {encoders_sentence(encoders)}")
        if tr.truncated_words[i]:
            lines.append(f"  CUT by the {view.limit}-token limit: {' '.join(tr.truncated_words[i])}")
    lines.append("tensors")
    for name in ("timesteps", "sigmas", "latents", "noise_uncond", "noise_text", "noise", "x0"):
        t = getattr(tr, name)
        if t is None:
            lines.append(f"  {name:<13} -")
        else:
            mib = t.numel() * t.element_size() / 2**20
            lines.append(f"  {name:<13} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                         f"  {mib:.2f} MiB")
    att = tr.attention
    if att is None:
        lines.append("attention    not recorded")
    else:
        total = 0.0
        for layer in att.layers:
            t = att[layer]
            total += t.numel() * t.element_size() / 2**20
        steps = att.steps
        lines.append(f"attention    {len(att.layers)} layers, {len(steps)} steps, "
                     f"{len(att.token_positions)} token positions"
                     f"{', heads kept' if att.heads else ''}, {total:.2f} MiB")
        for layer in att.layers:
            h, w = att.resolution(layer)
            lines.append(f"  {att.alias(layer):<10} {h}x{w}  {layer}")
    cm = getattr(tr, "concepts", None)
    if cm is not None:
        lines.append(f"concepts     {', '.join(map(repr, cm.concepts))}: {len(cm.layers)} layers "
                     f"({', '.join(cm.alias(l) for l in cm.layers)}), {len(cm.steps)} steps, "
                     f"{_mib(cm):.2f} MiB")
    i2t = getattr(tr, "image_to_text", None)
    if i2t is not None:
        lines.append(f"image→text   {len(i2t.layers)} layers, {len(i2t.steps)} steps, "
                     f"{len(i2t.token_positions)} token positions, {_mib(i2t):.2f} MiB")
    lines.append(f"images       {len(tr.images)}")
    return "\n".join(lines)


def _mib(maps) -> float:
    """MiB the maps hold as stored (codes and scales, or float maps)."""
    return sum(maps_nbytes(maps.stored(l)) for l in maps.layers) / 2**20


def _info_run(args: argparse.Namespace) -> int:
    path = _trace_file(args.trace)
    tr = _load_trace(args.trace)
    print(describe_trace(tr, path))
    return 0


# --------------------------------------------------------------------------- demo
def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", "-o", default="sdlens-demo", help="folder to write into")
    p.add_argument("--prompt", action="append", default=None,
                   help=f"prompt(s) to trace (repeatable; default {DEMO_PROMPTS[0]!r})")
    _add_model_options(p)
    _add_run_options(p, steps=20, cfg=None)  # the model's recommended CFG, else 5
    p.add_argument("--grid-cfg", default="1,3,5,9", help="guidance scales of the CFG x seed grid")
    p.add_argument("--grid-seeds", default="0,1,2", help="seeds of the CFG x seed grid")
    p.add_argument("--no-grid", action="store_true", help="skip the CFG x seed grid")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress output")


def _floats(text: str, what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not vals:
        raise UsageError(f"{what} is empty")
    return vals


def _demo_run(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    prompts = args.prompt or list(DEMO_PROMPTS)
    cfgs = _floats(args.grid_cfg, "--grid-cfg")
    try:
        seeds = [int(s) for s in args.grid_seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--grid-seeds must be comma-separated ints, got {args.grid_seeds!r}") from None
    args.grid_seed_values = seeds
    _check_run_args(args)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    _log(args, "loading the model ...")
    pipe = _load_pipe(args)
    if args.cfg is None:
        args.cfg = float(recommended_settings(pipe).get("guidance_scale", 5.0))
    written: list[Path] = []
    per_prompt = 6
    total = per_prompt * len(prompts) + (0 if args.no_grid else 1)
    with _progress(args, total, "demo") as bar:
        for i, prompt in enumerate(prompts):
            stem = "" if len(prompts) == 1 else f"{i}-"
            tr = _generate(pipe, args, prompt)
            _warn_truncated(tr)
            bar.update()
            files = {
                "image": out / f"{stem}image.png",
                "trace": out / f"{stem}run.sdlens",
                "heatmaps": out / f"{stem}heatmaps.png",
                "steps": out / f"{stem}steps.png",
                "report": out / f"{stem}report.html",
            }
            tr.images[0].save(files["image"])
            tr.save(files["trace"])
            bar.update()
            plot.heatmap_grid(tr).savefig(files["heatmaps"], dpi=110)
            bar.update()
            plot.step_strip(tr).savefig(files["steps"], dpi=110)
            bar.update()
            write_report(tr, files["report"])
            bar.update(2)
            written += list(files.values())
        if not args.no_grid:
            import matplotlib.pyplot as plt

            # untraced and batched: the sweep runs every (cfg, seed) cell in one call
            grid = sweep(pipe, prompts[0], seeds=seeds, guidance_scales=cfgs, steps=args.steps,
                         record=None, negative_prompt=args.negative, height=args.height,
                         width=args.width, progress=False, keep_axes=("guidance", "seed"))
            bar.update()
            path = out / "grid.png"
            fig = grid.plot(title=f"{prompts[0]!r}: guidance scale x seed")
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    for path in written:
        print(f"wrote {path}")
    print(f"done in {time.time() - t0:.1f} s; open {written[4 if len(written) > 4 else 0]} "
          "in a browser")
    return 0


register("demo", "trace the shipped model and write heatmaps, a step strip, a CFG x seed grid "
         "and an HTML report", _demo_args, _demo_run)
register("trace", "trace one prompt and save the trace file", _trace_args, _trace_run)
register("report", "write a self-contained HTML report of a trace file", _report_args, _report_run)
register("info", "print what a trace file holds", _info_args, _info_run, aliases=("inspect",))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sdlens", description="See inside Stable Diffusion while it samples.")
    parser.add_argument("--version", action="version", version=f"sdlens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, aliases=list(cmd.aliases))
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd)
    add_sweep_parser(sub)
    return parser


def _cfg_value(text: str) -> float:
    """``--cfg``: a finite number (argparse reports the ValueError's words)."""
    try:
        return check_guidance_scale(float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    """Entry point: returns the exit status (0 ok, 2 user error, 1 unexpected error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cmd = getattr(args, "_command", None)
    run = cmd.run if cmd is not None else getattr(args, "func", None)
    if run is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    prog = f"sdlens {args.command}"
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (UsageError, ValueError, TypeError, FileNotFoundError, NotImplementedError,
            ConnectionError, PermissionError, IsADirectoryError) as e:
        if os.environ.get("SDLENS_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
