"""``Studio(pipe)``: generate in a notebook and watch it denoise.

Prompt, negative prompt, seed, steps, CFG scale, scheduler and a Generate button. Sampling runs
traced (:func:`sdlens.engine.session.generate`) in a background thread, so the kernel stays free to
handle the Interrupt button; the pipeline's step callback (``callback_on_step_end``, or the older
``callback`` where a pipeline has only that: PixArt) streams the x0 prediction of every step
(linear latent->RGB decoder) into the live preview and moves the progress bar. Interrupt raises
:class:`Interrupted` inside that callback: the pipeline call stops and the trace engine restores
every hook. When a run finishes the live preview gives way to a :class:`TraceViewer` of it;
generating again puts the previous run beside it (:class:`ABView`: two columns, one step slider,
their difference, the settings that changed highlighted).

Settings are checked, never changed silently: steps below 1 or a seed outside what
``torch.Generator.manual_seed`` keeps as given stop the run with a message in the panel; a CFG
scale below 1 runs unguided (as diffusers does; Z-Image's at 0, Qwen-Image's without a negative
prompt: the backbone adapter's rule) and the panel says "guidance off". A
guidance-distilled model (Flux.1-dev) names its box "guidance (distilled)" (its value is an input
of the model; :func:`sdlens.analysis.guidance.guidance_setting`).
"""

from __future__ import annotations

import html
import inspect
import threading
import time
import warnings
from types import SimpleNamespace
from typing import Any

import ipywidgets as W
import torch

from sdlens.analysis.compare import run_settings
from sdlens.analysis.guidance import (check_guidance_scale, guidance_kind, guidance_setting,
                                     guidance_text)
from sdlens.analysis.previews import channels_rgb, latent_to_rgb, linear_decoder, to_image
from sdlens.engine.arch import adapter_for
from sdlens.engine.session import check_seed, generate, live_state
from sdlens.pipeline import SCHEDULERS, describe, make_scheduler, recommended_settings
from sdlens.views.widgets.ab_view import ABView, settings_text
from sdlens.views.widgets.frames import DECODER_LABELS, encode
from sdlens.views.widgets.trace_viewer import TraceViewer

DEFAULT_PROMPT = "a red circle and a blue square"


class Interrupted(Exception):
    """Raised in the step callback when the user presses Interrupt."""


def _callback_argument(pipe) -> str | None:
    """The step-callback argument ``pipe`` takes: "callback_on_step_end" (most pipelines),
    "callback" (the older ``callback(step, timestep, latents)``: PixArt), or None."""
    try:
        params = inspect.signature(type(pipe).__call__).parameters
    except (TypeError, ValueError):
        return "callback_on_step_end"
    return next((p for p in ("callback_on_step_end", "callback") if p in params), None)


def _call_default(pipe, name: str, fallback: Any) -> Any:
    """The default of argument ``name`` of the pipeline's ``__call__`` (``fallback`` if none)."""
    try:
        p = inspect.signature(type(pipe).__call__).parameters.get(name)
    except (TypeError, ValueError):
        return fallback
    return fallback if p is None or p.default is inspect.Parameter.empty else p.default


def _live_x0(pipe) -> torch.Tensor | None:
    """The x0 the trace engine computed for the step just taken (None when it has none)."""
    state = live_state(pipe)
    return None if state is None else state.get("x0")


class Studio(W.VBox):
    """A generation panel for ``pipe`` (see the module docstring).

    Args:
        pipe: a diffusers Stable Diffusion pipeline (``sdlens.load_pipeline()``).
        prompt, negative_prompt, seed, steps, guidance_scale, scheduler: initial control values
            (``steps`` / ``guidance_scale`` None: 20 / 7.5; ``scheduler`` "default" keeps the
            pipeline's, else a short name from ``sdlens.pipeline.SCHEDULERS``).
        keep: how many finished runs stay on screen side by side (2: A/B).
        preview_px: size of the live preview on screen.
        viewer: keyword arguments for each run's :class:`TraceViewer`.
        record: keyword arguments for :func:`sdlens.engine.session.generate` (``layers``, ...).
        pipe_kwargs: more arguments for every pipeline call (``height``, ``width``, PixArt's
            ``use_resolution_binning``, ...).

    A flow-matching pipeline (SD3, Sana) keeps its own scheduler: the menu's others (DDIM,
    Euler, ...) are the UNet models' noise schedules and are not offered. A backbone with a
    concept pass (joint attention: SD3 / SD3.5, the Flux families, Qwen-Image, Z-Image) gets a
    "concepts" box: comma-separated concepts are mapped in the run (``concepts=[...]``) and the
    run's viewer offers them in its "maps" menu.
    """

    def __init__(self, pipe: Any, prompt: str = DEFAULT_PROMPT, negative_prompt: str = "",
                 seed: int = 0, steps: int | None = None, guidance_scale: float | None = None,
                 scheduler: str = "default", keep: int = 2, preview_px: int = 192,
                 viewer: dict | None = None, record: dict | None = None,
                 pipe_kwargs: dict | None = None, **kwargs: Any):
        adapter_for(pipe)  # TypeError naming the supported pipelines
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be a positive int, got {keep!r}")
        self.info = describe(pipe)
        flow = self.info.prediction_type == "flow"  # a velocity model: its own scheduler only
        sched_opts = ["default"] + ([] if flow else list(SCHEDULERS))
        if scheduler not in sched_opts:
            raise ValueError(f"scheduler must be one of {sched_opts}, got {scheduler!r}")
        self.pipe = pipe
        self.keep = keep
        # the model folder's recommended settings (the shipped MMDiT's CFG 3 and
        # max_sequence_length=0) are the defaults; what the caller passes wins
        rec = recommended_settings(pipe)
        self.pipe_kwargs = {**{k: v for k, v in rec.items()
                               if k not in ("guidance_scale", "num_inference_steps")},
                            **(pipe_kwargs or {})}
        if guidance_scale is None and "guidance_scale" in rec:
            guidance_scale = float(rec["guidance_scale"])
        if steps is None and "num_inference_steps" in rec:
            steps = int(rec["num_inference_steps"])
        self._callback_arg = _callback_argument(pipe)
        self.viewer_kwargs = dict(viewer or {})
        self.record_kwargs = dict(record or {})
        self.runs: list[dict] = []  # {"settings": ..., "trace": ..., "viewer": ..., "seconds": ...}
        self.streamed: list[bytes] = []  # the live previews of the current / last run
        self.error: BaseException | None = None
        self.interrupted_at: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._decoder = None

        style = {"description_width": "110px"}
        lay = W.Layout(width="520px")
        self.prompt = W.Textarea(prompt, description="prompt", layout=W.Layout(width="520px", height="52px"), style=style)
        self.negative_prompt = W.Text(negative_prompt, description="negative prompt", layout=lay, style=style)
        check_seed(seed)
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        # plain number boxes: a slider would clamp 0 steps to 1 or CFG -1 to 0 without a word;
        # the values are checked when Generate is pressed
        self.seed = W.IntText(seed, description="seed", style=style, layout=W.Layout(width="260px"))
        self.steps = W.IntText(steps or 20, description="steps", style=style,
                               layout=W.Layout(width="220px"))
        # a guidance-distilled model (Flux.1-dev) takes its guidance value as an input: no
        # unconditional pass, its own default (the pipeline's), no "off" below 1
        distilled = adapter_for(pipe).guidance_meta({"guidance_scale": 1.0}).get("distilled_guidance")
        self.guidance_kind = "distilled" if distilled is not None else "cfg"
        if guidance_scale is None:
            guidance_scale = _call_default(pipe, "guidance_scale", 3.5) \
                if self.guidance_kind == "distilled" else 7.5
        self.guidance_scale = W.FloatText(guidance_scale,
                                          description=guidance_setting(self.guidance_kind),
                                          style=style, layout=W.Layout(width="220px"))
        self.guidance_note = W.HTML("")
        # concept maps (ConceptAttention) where the backbone has a concept pass (joint attention)
        self.concepts: W.Text | None = None
        if adapter_for(pipe).concept_blocks() is not None:
            self.concepts = W.Text("", description="concepts", layout=lay, style=style,
                                   placeholder="comma-separated, e.g. circle, square, background")
        self.guidance_scale.observe(lambda _c: self._note_guidance(), names="value")
        self.negative_prompt.observe(lambda _c: self._note_guidance(), names="value")
        self.scheduler = W.Dropdown(options=[(f"default ({self.info.scheduler_class})", "default")]
                                    + [(f"{k} ({SCHEDULERS[k]})", k) for k in sched_opts[1:]],
                                    value=scheduler, description="scheduler", style=style, layout=lay)
        self.generate_button = W.Button(description="Generate", button_style="primary", icon="play")
        self.interrupt_button = W.Button(description="Interrupt", button_style="danger", icon="stop",
                                         disabled=True)
        self.clear_button = W.Button(description="Clear runs", icon="trash")
        self.progress = W.IntProgress(value=0, min=0, max=1, description="", layout=W.Layout(width="360px"))
        self.status = W.HTML("")
        self.live = W.Image(format="png", width=preview_px, height=preview_px)
        self.live_caption = W.HTML("")
        self.live_box = W.VBox([self.live, self.live_caption], layout=W.Layout(display="none"))
        self.results = W.VBox([], layout=W.Layout(width="100%"))
        self.ab: ABView | None = None

        self.generate_button.on_click(lambda _b: self._on_generate())
        self.interrupt_button.on_click(lambda _b: self.interrupt())
        self.clear_button.on_click(lambda _b: self.clear())
        controls = W.VBox([
            self.prompt, self.negative_prompt, W.HBox([self.seed, self.steps]),
            W.HBox([self.guidance_scale, self.guidance_note]), self.scheduler,
            *([self.concepts] if self.concepts is not None else []),
            W.HBox([self.generate_button, self.interrupt_button, self.clear_button, self.progress]),
            self.status,
        ])
        super().__init__([controls, self.live_box, self.results], **kwargs)
        self._note_guidance()

    def _note_guidance(self) -> None:
        g = self.guidance_scale.value
        if self.guidance_kind == "distilled":
            self.guidance_note.value = ("<span style='color:#777'>distilled: the value is an "
                                        "input of the model, no unconditional pass</span>")
            return
        adapter = adapter_for(self.pipe)  # the family's rule (Z-Image guides above 0)
        if adapter.cfg_weight(g) is not None:
            off = adapter.cfg_needs_negative and not self.negative_prompt.value
            self.guidance_note.value = (
                "<span style='color:#b06000'>guidance off: this model guides only with a "
                "negative prompt</span>" if off else "")
        elif adapter.cfg_weight(1.0) is not None:  # off at 0 and below, not at 1
            self.guidance_note.value = (f"<span style='color:#777'>guidance off (CFG {g:g}: "
                                        "0 = no guidance)</span>")
        else:
            self.guidance_note.value = (
                f"<span style='color:#b06000'>guidance off: CFG {g:g} is below 1, the run is "
                "unguided (as at 1)</span>" if g < 1 else
                "<span style='color:#777'>guidance off (1 = no guidance)</span>")

    # ---------------------------------------------------------------- settings
    def settings(self) -> dict:
        """The controls' current values (``concepts``: a list, where the model has the box)."""
        s = {"prompt": self.prompt.value, "negative_prompt": self.negative_prompt.value,
             "seed": int(self.seed.value), "steps": int(self.steps.value),
             "guidance_scale": float(self.guidance_scale.value),
             "scheduler": self.scheduler.value}
        if self.concepts is not None:
            s["concepts"] = [c.strip() for c in self.concepts.value.split(",") if c.strip()]
        return s

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def traces(self) -> list:
        return [r["trace"] for r in self.runs]

    @property
    def viewer(self) -> TraceViewer | None:
        """The TraceViewer of the latest finished run."""
        return self.runs[-1]["viewer"] if self.runs else None

    # ---------------------------------------------------------------- actions
    def check(self, s: dict | None = None) -> list[str]:
        """What is wrong with the settings (``s``, default the controls'), in words; [] = fine."""
        s = self.settings() if s is None else s
        problems = []
        if s["steps"] < 1:
            problems.append(f"steps must be at least 1 (got {s['steps']})")
        for check, value in ((check_seed, s["seed"]), (check_guidance_scale, s["guidance_scale"])):
            try:
                check(value)
            except ValueError as e:
                problems.append(str(e))
        return problems

    def _on_generate(self) -> None:
        try:
            self.generate()
        except ValueError:  # already shown in the panel
            pass

    def generate(self, wait: bool = False, timeout: float | None = None) -> None:
        """Start a run with the current settings (the Generate button). ``wait``: block until it
        ends (scripts, tests, notebooks run top to bottom). Bad settings (steps < 1, a seed
        outside 0..2**64-1) raise ValueError and are shown in the panel; nothing runs. An empty
        prompt is fine (unconditional sampling)."""
        if self.running:
            raise RuntimeError("a run is in progress; Interrupt it or wait for it")
        s = self.settings()
        problems = self.check(s)
        if problems:
            self.status.value = ("<b style='color:#b00'>not run: "
                                 + html.escape("; ".join(problems)) + "</b>")
            raise ValueError("; ".join(problems))
        self._stop.clear()
        self.error = None
        self.interrupted_at = None
        self.streamed = []
        self.progress.max = s["steps"]
        self.progress.value = 0
        self.progress.bar_style = ""
        self.generate_button.disabled = True
        self.interrupt_button.disabled = False
        self.live_box.layout.display = "flex"
        self.live_caption.value = ""
        self.status.value = "sampling…"
        self._thread = threading.Thread(target=self._run, args=(s,), daemon=True, name="sdlens-studio")
        self._thread.start()
        if wait:
            self.wait(timeout)

    def wait(self, timeout: float | None = None) -> None:
        """Block until the current run (if any) has finished."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the run did not finish within {timeout} s")

    def interrupt(self) -> None:
        """Stop the current run after the step in progress (the Interrupt button)."""
        if self.running:
            self._stop.set()
            self.status.value = "interrupting…"

    def clear(self) -> None:
        """Forget the finished runs."""
        self.runs.clear()
        self.ab = None
        self.results.children = ()

    # ---------------------------------------------------------------- the run
    def _live_png(self, pipe, cb_kwargs: dict) -> tuple[bytes, str]:
        if self._decoder is None:
            try:
                # the model folder's own fit first (the shipped MMDiT's), else the VAE's
                model = SimpleNamespace(meta={"family": self.info.family,
                                              "model_id": getattr(pipe, "name_or_path", None)})
                self._decoder = linear_decoder(model, vae=pipe.vae)
            except ValueError:
                self._decoder = (None, None)
        x = _live_x0(pipe)
        what = "x0 prediction"
        if x is None:
            x, what = cb_kwargs.get("latents"), "x_t (no x0 recorded)"
        x = x[0].detach().float().cpu()
        m, b = self._decoder
        rgb = latent_to_rgb(x, m, b) if m is not None else channels_rgb(x)
        what += f" · {DECODER_LABELS['linear' if m is not None else 'channels']}"
        lo_h = max(64, rgb.shape[-2])
        return encode(to_image(rgb, (lo_h, round(lo_h * rgb.shape[-1] / rgb.shape[-2]))), "png"), what

    def _callback(self, pipe, i: int, t: Any, cb_kwargs: dict) -> dict:
        if self._stop.is_set():
            self.interrupted_at = i
            raise Interrupted(f"interrupted at step {i + 1}")
        ts = getattr(pipe.scheduler, "timesteps", None)
        n = (len(ts) if ts is not None else 0) or self.progress.max
        png, what = self._live_png(pipe, cb_kwargs)
        self.streamed.append(png)
        self.live.value = png
        self.live_caption.value = f"{what} · step {i + 1}/{n} · t={float(t):.0f}"
        if self.progress.max != n:
            self.progress.max = n
        self.progress.value = i + 1
        return {}

    def _run(self, s: dict) -> None:
        pipe = self.pipe
        original = pipe.scheduler
        t0 = time.perf_counter()
        try:
            if s["scheduler"] != "default":
                pipe.scheduler = make_scheduler(s["scheduler"], original.config)
            with warnings.catch_warnings():  # "guidance off" is in the panel already
                warnings.filterwarnings("ignore", message=r"sdlens: guidance_scale=.* below 1")
                callback: dict[str, Any] = {}
                if self._callback_arg == "callback_on_step_end":
                    callback["callback_on_step_end"] = self._callback
                elif self._callback_arg == "callback":  # callback(step, timestep, latents)
                    callback["callback"] = lambda i, t, latents: self._callback(
                        pipe, i, t, {"latents": latents})
                record = dict(self.record_kwargs)
                if s.get("concepts"):  # the box's concepts (an empty box: none)
                    record["concepts"] = s["concepts"]
                tr = generate(pipe, s["prompt"], seed=s["seed"], steps=s["steps"],
                              guidance_scale=s["guidance_scale"],
                              negative_prompt=s["negative_prompt"] or None,
                              **callback, **self.pipe_kwargs, **record)
            seconds = time.perf_counter() - t0
            self.status.value = f"done in {seconds:.1f} s · building the viewer…"
            viewer = TraceViewer(tr, **self.viewer_kwargs)
            self.runs.append({"settings": s, "trace": tr, "viewer": viewer, "seconds": seconds})
            self.runs[:] = self.runs[-self.keep:]
            self._show_runs()
            self.progress.bar_style = "success"
            self.live_box.layout.display = "none"
            done = f"done in {seconds:.1f} s"
            if guidance_kind(tr) != "cfg":  # "guidance off", "guidance 3.5 (distilled)"
                done += " · " + guidance_text(tr)
            if not s["prompt"].strip():
                done += " · empty prompt: unconditional sampling, no words to map"
            self.status.value = done
        except Interrupted as e:
            self.progress.bar_style = "warning"
            self.status.value = f"<b>{html.escape(str(e))}</b> (the pipeline is restored; no trace kept)"
        except Exception as e:  # shown in the panel; also kept for the caller
            self.error = e
            self.progress.bar_style = "danger"
            self.status.value = f"<b style='color:#b00'>{html.escape(type(e).__name__)}: {html.escape(str(e))}</b>"
        finally:
            pipe.scheduler = original
            self.generate_button.disabled = False
            self.interrupt_button.disabled = True

    def _show_runs(self) -> None:
        """The last two runs as A/B columns (:class:`ABView`); older kept runs above them."""
        letters = "ABCDEFGHIJ"
        boxes: list[Any] = []
        runs = self.runs
        older = runs[:-2] if len(runs) > 2 else ([] if len(runs) == 2 else runs)
        for k, run in enumerate(older):
            tr, v = run["trace"], run["viewer"]
            head = W.HTML(f"<b>{letters[k % len(letters)]}</b> · "
                          + settings_text(run_settings(tr, v.batch)) + f" · {run['seconds']:.1f} s")
            boxes.append(W.VBox([head, v], layout=W.Layout(border="1px solid #ddd", padding="4px",
                                                          margin="2px")))
        self.ab = None
        if len(runs) >= 2:
            a, b = runs[-2], runs[-1]
            k = len(runs) - 2
            self.ab = ABView(a["trace"], b["trace"], a["viewer"], b["viewer"],
                             labels=(letters[k % len(letters)], letters[(k + 1) % len(letters)]),
                             extra_a=f"{a['seconds']:.1f} s", extra_b=f"{b['seconds']:.1f} s",
                             layout=W.Layout(width="100%"))
            boxes.append(self.ab)
        self.results.children = tuple(boxes)

    def ab_diff(self) -> dict:
        """The settings that differ between the last two runs: ``{name: (A, B)}``."""
        if len(self.runs) < 2:
            return {}
        a, b = self.runs[-2]["settings"], self.runs[-1]["settings"]
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}
