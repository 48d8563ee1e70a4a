"""Tracing does not change the call (issue 28): for every pipeline class sdlens supports, a spy on
the class's own ``__call__`` sees exactly the same arguments traced as untraced (positional stays
positional, keywords stay keywords, ``**kwargs`` bundles arrive as their keywords, no default
filled in), the same warnings reach the user, and the return value and its type are unchanged.
The one difference allowed is sdlens's ``callback_on_step_end`` (which calls the user's) and,
where ``"latents"`` must be added, ``callback_on_step_end_tensor_inputs``."""

from __future__ import annotations

import functools
import inspect
import warnings

import pytest
import torch

import diffusers
import sdlens
from sdlens.engine.arch import SUPPORTED_PIPELINES
from sdlens.testing import BEDS_2026, call_kwargs_2026, controlnet_for, random_pipeline
from pipelines import PROMPT, task_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

ADDED = ("callback_on_step_end", "callback_on_step_end_tensor_inputs")  # what sdlens may put in

# class -> (test bed, task, ControlNet); PixArt-alpha is built from the PixArt-Sigma test bed's
# components (the same ones)
PIPES = {
    "StableDiffusionPipeline": ("sd15", "txt2img", False),
    "StableDiffusionImg2ImgPipeline": ("sd15", "img2img", False),
    "StableDiffusionInpaintPipeline": ("sd15", "inpaint", False),
    "StableDiffusionXLPipeline": ("sdxl", "txt2img", False),
    "StableDiffusionXLImg2ImgPipeline": ("sdxl", "img2img", False),
    "StableDiffusionXLInpaintPipeline": ("sdxl", "inpaint", False),
    "StableDiffusionControlNetPipeline": ("sd15", "txt2img", True),
    "StableDiffusionControlNetImg2ImgPipeline": ("sd15", "img2img", True),
    "StableDiffusionControlNetInpaintPipeline": ("sd15", "inpaint", True),
    "StableDiffusionXLControlNetPipeline": ("sdxl", "txt2img", True),
    "StableDiffusionXLControlNetImg2ImgPipeline": ("sdxl", "img2img", True),
    "StableDiffusionXLControlNetInpaintPipeline": ("sdxl", "inpaint", True),
    "StableDiffusion3Pipeline": ("sd35", "txt2img", False),
    "StableDiffusion3Img2ImgPipeline": ("sd3", "img2img", False),
    "StableDiffusion3InpaintPipeline": ("sd3", "inpaint", False),
    "FluxPipeline": ("flux", "txt2img", False),
    "FluxImg2ImgPipeline": ("flux", "img2img", False),
    "FluxInpaintPipeline": ("flux", "inpaint", False),
    "PixArtAlphaPipeline": ("pixart", "txt2img", False),
    "PixArtSigmaPipeline": ("pixart", "txt2img", False),
    "SanaPipeline": ("sana", "txt2img", False),
    # the 2026 families (their test beds' own fast calls: sdlens.testing.call_kwargs_2026)
    "ChromaPipeline": ("chroma", "txt2img", False),
    "FluxKontextPipeline": ("flux-kontext", "txt2img", False),
    "Flux2Pipeline": ("flux2", "txt2img", False),
    "Flux2KleinPipeline": ("flux2-klein", "txt2img", False),
    "QwenImagePipeline": ("qwen-image", "txt2img", False),
    "QwenImageEditPipeline": ("qwen-image-edit", "txt2img", False),  # Kontext's: image first
    "QwenImageEditPlusPipeline": ("qwen-image-edit", "txt2img", False),
    "ZImagePipeline": ("z-image", "txt2img", False),
    "WanPipeline": ("wan", "txt2img", False),  # video: the output's .frames
}
# img2img / inpaint / image-to-video classes of the 2026 families: the same _Session.run, the
# same family adapter as their txt2img class above (covered per family, not per class)
SAME_FAMILY = {"ChromaImg2ImgPipeline": "ChromaPipeline", "ChromaInpaintPipeline": "ChromaPipeline",
               "Flux2KleinInpaintPipeline": "Flux2KleinPipeline",
               "QwenImageImg2ImgPipeline": "QwenImagePipeline",
               "QwenImageInpaintPipeline": "QwenImagePipeline",
               "WanImageToVideoPipeline": "WanPipeline"}
NAMES = list(PIPES)


def test_every_supported_class_is_covered():
    covered = set(PIPES) | {c for c, txt in SAME_FAMILY.items() if txt in PIPES}
    assert set(SUPPORTED_PIPELINES) <= covered, set(SUPPORTED_PIPELINES) - covered
    for cls, txt in SAME_FAMILY.items():  # the same adapter as the class that is called here
        assert type(adapter_for_class(cls)) is type(adapter_for_class(txt)), cls


def adapter_for_class(name: str):
    """The adapter sdlens picks for a pipeline of class ``name`` (built from its family's bed)."""
    from sdlens.engine.arch import ADAPTERS

    return next(a for a in ADAPTERS if name in a.pipelines)


@functools.lru_cache(maxsize=None)
def pipe_of(name: str):
    arch, task, control = PIPES[name]
    base = random_pipeline(arch, task=task, seed=0)
    cls = getattr(diffusers, name)
    if type(base) is cls:
        return base
    comps = dict(base.components)
    if control:
        comps["controlnet"] = controlnet_for(base)
    params = inspect.signature(cls.__init__).parameters
    pipe = cls(**{k: v for k, v in comps.items() if k in params})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def signature(name: str):
    return inspect.signature(getattr(diffusers, name).__call__).parameters


def inputs(name: str) -> dict:
    """Tiny keyword inputs of one call (no generator, no prompt): 2 steps (img2img: 1 run)."""
    arch, task, control = PIPES[name]
    kw = dict(task_inputs(task), num_inference_steps=2,
              output_type="latent")
    if control:
        cond = task_inputs("img2img")["image"]
        kw["image" if task == "txt2img" else "control_image"] = cond
    if arch in ("pixart", "sana"):
        kw.update(use_resolution_binning=False, clean_caption=False)
    if arch in ("sd3", "sd35", "flux", "sana") and task == "txt2img":
        kw.update(height=32, width=32) if arch == "sana" else kw.update(height=64, width=64)
    if arch == "wan":
        kw.update(num_frames=5, height=32, width=32)
    elif arch in BEDS_2026:
        kw = {k: v for k, v in call_kwargs_2026(arch).items() if k not in ("prompt", "generator")}
    return kw


class Spy:
    """Records what the class's own ``__call__`` receives (set on the class before tracing, so
    the traced subclass sdlens swaps in calls it)."""

    def __init__(self, monkeypatch, cls):
        orig = cls.__dict__["__call__"]
        self.calls = []

        @functools.wraps(orig)
        def spy(pipe, *args, **kwargs):
            self.calls.append((args, dict(kwargs)))
            return orig(pipe, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", spy)


def same(a, b) -> bool:
    """Equal arguments: the same object, or generators seeded alike (each call gets a fresh one),
    or equal containers of such."""
    if a is b:
        return True
    if isinstance(a, torch.Generator) and isinstance(b, torch.Generator):
        return a.initial_seed() == b.initial_seed()
    if isinstance(a, (list, tuple)) and type(a) is type(b):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    return type(a) is type(b) and a == b


def user_warnings(record) -> list[tuple[type, str]]:
    return [(w.category, str(w.message)) for w in record if not str(w.message).startswith("sdlens")]


def call_both(monkeypatch, name: str, make_call, untraced_first: bool = True):
    """Call the pipeline untraced then traced with ``make_call() -> (args, kwargs)`` (fresh
    generators each time): per side ``(received args, received kwargs, output, warnings)``."""
    pipe = pipe_of(name)
    spy = Spy(monkeypatch, getattr(diffusers, name))
    sides = []
    for traced in (False, True):
        args, kwargs = make_call()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            if traced:
                with sdlens.trace(pipe) as tr:
                    out = pipe(*args, **kwargs)
                assert len(tr.runs) == 1, "the traced call was not recorded"
            else:
                out = pipe(*args, **kwargs)
        assert len(spy.calls) == len(sides) + 1, "the class's __call__ was not called once"
        sides.append((*spy.calls[-1], out, user_warnings(rec)))
    return sides


def assert_same_call(name, plain, traced, user_callback=None):
    """The traced call received what the untraced one did, sdlens's callback aside."""
    (args0, kw0, _, _), (args1, kw1, _, _) = plain, traced
    assert len(args0) == len(args1) and all(same(a, b) for a, b in zip(args0, args1)), \
        "positional arguments differ"
    assert {k: v for k, v in kw0.items() if k not in ADDED}.keys() == \
        {k: v for k, v in kw1.items() if k not in ADDED}.keys(), "keywords differ"
    for k in kw0.keys() - set(ADDED):
        assert same(kw0[k], kw1[k]), f"keyword {k} differs"
    params = signature(name)
    if "callback_on_step_end" in params:
        assert callable(kw1["callback_on_step_end"])
        assert kw1["callback_on_step_end"] is not user_callback  # sdlens's, composed
        given = kw0.get("callback_on_step_end_tensor_inputs")
        if given is None:
            assert "callback_on_step_end_tensor_inputs" not in kw1  # the pipeline's default
        else:
            want = list(given) + ([] if "latents" in given else ["latents"])
            assert kw1["callback_on_step_end_tensor_inputs"] == want
    else:  # nothing to add (PixArt): the call is the same call
        assert kw0.keys() == kw1.keys()


def assert_same_output(out0, out1):
    assert type(out0) is type(out1)
    if isinstance(out0, tuple):
        assert len(out0) == len(out1)
        for a, b in zip(out0, out1):
            assert type(a) is type(b) and same(a, b), "return values differ"
    else:
        field = "frames" if hasattr(out0, "frames") else "images"  # video pipelines: frames
        assert torch.equal(getattr(out0, field), getattr(out1, field)), "tracing changed the latents"


def gen():
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("name", NAMES)
def test_keywords_reach_the_pipeline_unchanged(monkeypatch, name):
    """Keywords only, an unknown extra keyword where the signature takes ``**kwargs``; the
    pipeline's defaults are left to the pipeline."""
    extra = {"foo": 1} if any(p.kind is p.VAR_KEYWORD for p in signature(name).values()) else {}
    plain, traced = call_both(monkeypatch, name, lambda: (
        (), dict(prompt=PROMPT, generator=gen(), **inputs(name), **extra)))
    assert_same_call(name, plain, traced)
    if extra:
        assert plain[1]["foo"] == traced[1]["foo"] == 1
    assert_same_output(plain[2], traced[2])
    assert plain[3] == traced[3], "the pipeline's warnings differ"


@pytest.mark.parametrize("name", NAMES)
def test_positional_arguments_and_tuples(monkeypatch, name):
    """The first argument (the prompt; Kontext's: the image) given positionally stays positional;
    ``return_dict=False`` gives the same tuple."""
    kw = dict(return_dict=False, **inputs(name))
    first = list(signature(name))[1]  # after self
    value = (kw.pop(first, None) if first != "prompt" else PROMPT)  # Flux.2: image=None
    if first != "prompt":
        kw["prompt"] = PROMPT
    plain, traced = call_both(monkeypatch, name, lambda: ((value,), dict(kw, generator=gen())))
    assert plain[0] == traced[0] == (value,)
    assert_same_call(name, plain, traced)
    # a tuple (some SDXL pipelines return their output class for latents all the same): the
    # same type either way
    assert_same_output(plain[2], traced[2])
    assert plain[3] == traced[3]


STEP_END = [n for n in NAMES if "callback_on_step_end" in signature(n)]
ONE_PER_FAMILY = ["StableDiffusionPipeline", "StableDiffusionXLPipeline",
                  "StableDiffusion3Pipeline", "FluxPipeline", "SanaPipeline"]


@pytest.mark.parametrize("name,tensor_inputs", [(n, None) for n in STEP_END] + [
    (n, t) for n in ONE_PER_FAMILY for t in (["latents"], ["prompt_embeds"])])
def test_user_step_end_callback_is_called(monkeypatch, name, tensor_inputs):
    """The user's step-end callback runs, traced as untraced, with the tensors it asked for; its
    tensor inputs reach the pipeline as given, ``"latents"`` added only where missing."""
    if tensor_inputs == ["prompt_embeds"] and "prompt_embeds" not in \
            getattr(diffusers, name)._callback_tensor_inputs:
        pytest.skip("no prompt_embeds among this pipeline's callback tensors")
    seen = []

    def user(pipe, i, t, kw):
        seen.append((i, sorted(kw)))
        return {}

    extra = {} if tensor_inputs is None else {"callback_on_step_end_tensor_inputs": tensor_inputs}
    plain, traced = call_both(monkeypatch, name, lambda: (
        (), dict(prompt=PROMPT, generator=gen(), callback_on_step_end=user, **extra,
                 **inputs(name))))
    assert plain[1]["callback_on_step_end"] is user
    assert_same_call(name, plain, traced, user_callback=user)
    n = len(seen) // 2
    assert n >= 1 and len(seen) == 2 * n
    untraced_seen, traced_seen = seen[:n], seen[n:]
    assert [i for i, _ in traced_seen] == [i for i, _ in untraced_seen]
    # the user's callback gets at least what it asked for (sdlens may add the latents)
    for (_, k0), (_, k1) in zip(untraced_seen, traced_seen):
        assert set(k0) <= set(k1) and set(k1) - set(k0) <= {"latents"}
    assert_same_output(plain[2], traced[2])


LEGACY = [n for n in NAMES if PIPES[n][0] in ("sd15", "sdxl", "pixart")]


@pytest.mark.parametrize("name", LEGACY)
def test_legacy_callback_reaches_the_pipeline(monkeypatch, name):
    """``callback`` / ``callback_steps`` (in the signature: PixArt; through ``**kwargs`` with
    a deprecation warning: the UNet pipelines) are called traced as untraced."""
    seen = []

    def callback(i, t, latents):
        seen.append(i)

    plain, traced = call_both(monkeypatch, name, lambda: (
        (), dict(prompt=PROMPT, generator=gen(), callback=callback, callback_steps=1,
                 **inputs(name))))
    assert seen and seen[: len(seen) // 2] == seen[len(seen) // 2:]
    assert traced[1]["callback_steps"] == 1 and traced[1]["callback"] is callback
    assert_same_call(name, plain, traced)
    assert plain[3] == traced[3]
    if "callback" not in signature(name):  # deprecated: the pipeline's warning reaches the user
        assert any(c is FutureWarning and "callback" in m for c, m in traced[3])


@pytest.mark.parametrize("traced", [False, True])
def test_deprecated_mask_feature_warns(monkeypatch, traced):
    """PixArt-alpha's deprecated ``mask_feature`` (a ``**kwargs`` keyword) warns traced as
    untraced."""
    name = "PixArtAlphaPipeline"
    pipe = pipe_of(name)
    spy = Spy(monkeypatch, type(pipe))
    kw = dict(prompt=PROMPT, generator=gen(), mask_feature=True, **inputs(name))
    with pytest.warns(FutureWarning, match="mask_feature"):
        if traced:
            with sdlens.trace(pipe):
                pipe(**kw)
        else:
            pipe(**kw)
    assert spy.calls[-1][1]["mask_feature"] is True


@pytest.mark.parametrize("name", [n for n in NAMES if not any(
    p.kind is p.VAR_KEYWORD for p in signature(n).values())])
def test_unknown_keyword_is_the_same_error(name):
    """Where the signature takes no ``**kwargs``, an unknown keyword is a TypeError naming it,
    traced as untraced (nothing is run)."""
    pipe = pipe_of(name)
    with pytest.raises(TypeError, match="foo"):
        pipe(prompt=PROMPT, foo=1)
    with sdlens.trace(pipe) as tr, pytest.raises(TypeError, match="foo"):
        pipe(prompt=PROMPT, foo=1)
    assert type(pipe) is getattr(diffusers, name) and not tr.runs


def test_issue_28_legacy_callback_reproduction():
    """Issue 28's reproduction: the legacy callback is called at every step, traced too."""
    sd = random_pipeline("sd15")
    seen = []
    a = dict(prompt="a cat", num_inference_steps=2, output_type="latent",
             callback=lambda i, t, l: seen.append(i), callback_steps=1)
    with pytest.warns(FutureWarning, match="callback"):
        sd(**a)
    assert seen == [1, 2]
    untraced, seen[:] = list(seen), []
    with sdlens.trace(sd) as tr, pytest.warns(FutureWarning, match="callback"):
        sd(**a)
    assert seen == untraced and len(tr.runs) == 1
