"""Z-Image traced: the random-weight bed (2 single-stream layers, 1 + 1 refiners), CPU fp32, 2
steps, 32 px (4x4 latents, 2x2 patches)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import sdlens
from sdlens.analysis.tokens import trace_words
from sdlens.engine.arch import adapter_for
from sdlens.engine.arch.base import attention_processors
from sdlens.testing import call_kwargs_2026, random_pipeline
from test_kernel_maps import KernelSpy, explicit

PROMPT = "a red cat on the beach"
STEPS = 2


@functools.lru_cache(maxsize=None)
def bed():
    return random_pipeline("z-image", seed=0)


def kwargs(cfg: bool, **kw):
    # a fresh prompt list per call: the pipeline writes the templated text into a list prompt
    return call_kwargs_2026("z-image", steps=STEPS,
                            **{"prompt": PROMPT, "guidance_scale": 4.0 if cfg else 0.0, **kw})


@functools.lru_cache(maxsize=None)
def traced(cfg: bool):
    pipe = bed()
    plain = pipe(**kwargs(cfg)).images
    with sdlens.trace(pipe, attention_dtype=torch.float32) as tr:
        out = pipe(**kwargs(cfg)).images
    return pipe, plain, out, tr.runs[-1]


@pytest.mark.parametrize("cfg", [False, True])
def test_traced_run_is_the_untraced_run(cfg):
    _, plain, out, tr = traced(cfg)
    assert torch.equal(plain, out)
    assert tr.meta["family"] == "z-image" and tr.prediction_type == "flow"
    assert tr.latents.shape == (STEPS + 1, 1, 16, 4, 4) and torch.equal(tr.latents[-1], out)
    assert tr.noise.shape == tr.x0.shape == (STEPS, 1, 16, 4, 4)
    assert tr.meta["denoiser_calls"] == STEPS  # CFG is one batched call


def test_cfg_is_one_batch_and_the_guided_identity():
    _, _, _, tr = traced(True)
    assert tr.do_cfg and tr.guidance_scale == 4.0
    # the pipeline steps with -(pos + g (pos - neg)); the halves are recorded negated
    torch.testing.assert_close(tr.noise, tr.noise_text + 4.0 * (tr.noise_text - tr.noise_uncond),
                               rtol=0, atol=1e-6)
    assert not torch.allclose(tr.noise_uncond, tr.noise_text)
    _, _, _, plain = traced(False)
    assert not plain.do_cfg and plain.noise_uncond is None
    torch.testing.assert_close(plain.noise, plain.noise_text, rtol=0, atol=0)


@pytest.mark.parametrize("cfg", [False, True])
def test_flow_x0_and_last_step(cfg):
    _, _, _, tr = traced(cfg)
    s = tr.sigmas[:, None, None, None, None]
    torch.testing.assert_close(tr.x0, tr.latents[:-1] - s * tr.noise)
    torch.testing.assert_close(tr.x0[-1], tr.latents[-1], rtol=1e-5, atol=1e-5)


def test_every_layer_recorded_and_the_template_left_out():
    pipe, _, _, tr = traced(True)
    maps = tr.attention
    n = pipe.transformer.config.n_layers
    assert maps.layers == [f"layers.{i}.attention" for i in range(n)] and "skipped" not in tr.meta
    assert maps.names("layer.1") == [maps.layers[1]] and maps.names("layers") == maps.layers
    assert [w.text for w in trace_words(tr)] == PROMPT.split()
    assert len(tr.tokens[0]) == 6 and maps.token_positions == list(range(6))
    for layer in maps.layers:
        m = maps[layer]
        assert m.shape == (STEPS, 1, 6, 2, 2) and (m >= 0).all() and (m.sum(2) < 1).all()


def test_full_size_sites_on_the_meta_device():
    pipe = random_pipeline("z-image", scale=1, device="meta")
    n = pipe.transformer.config.n_layers
    assert n == 30 and adapter_for(pipe).sites() == [f"layers.{i}.attention" for i in range(n)]


def maps_with_spy(pipe, **call):
    adapter = adapter_for(pipe)
    spy = KernelSpy(adapter.denoiser, adapter.sites())
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="sdlens")  # nothing skipped
            with spy, sdlens.trace(pipe, attention_dtype=torch.float32) as tr:
                pipe(**call)
    finally:
        spy.remove()
    return tr.runs[-1], spy


@pytest.mark.parametrize("case", ["cfg", "prompts of different lengths"])
def test_maps_equal_the_explicit_softmax(case):
    """The layout is built here from the bed's numbers: 4 image patches padded to 32, then
    the caption, whose chat template opens with 3 tokens (<|im_start|> user \\n)."""
    pipe = bed()
    prompts = [PROMPT, "a cat"] if case != "cfg" else [PROMPT]
    negative = "a long negative prompt " * 8
    tr, spy = maps_with_spy(pipe, **kwargs(True, prompt=prompts,
                                           negative_prompt=[negative] * len(prompts)))
    maps, n = tr.attention, 0
    batch = tr.latents.shape[1]
    for layer in maps.layers:
        for i, step in enumerate(maps.steps):
            q, k, mask, scale = spy.calls[(step, layer)][0]
            assert q.shape[0] == 2 * batch and mask is not None  # the negative is longer
            p = explicit(q, k, mask, scale)[:batch, :, :4, 32 + 3:]  # the prompts' rows
            want = p[..., maps.token_positions].mean(1).transpose(-1, -2)
            torch.testing.assert_close(maps[layer][i].double().flatten(-2), want,
                                       atol=1e-6, rtol=0)
            n += 1
    assert n == len(maps.layers) * STEPS


def test_heatmap_of_every_word():
    _, _, _, tr = traced(True)
    for w in trace_words(tr):
        hm = torch.as_tensor(tr.heatmap(w.text, occurrence=w.occurrence))
        assert hm.shape == (32, 32) and torch.isfinite(hm).all() and hm.max() > 0


def test_save_load_round_trip(tmp_path):
    _, _, _, tr = traced(True)
    back = sdlens.load(tr.save(tmp_path / "zimage.sdlens"))
    assert back.meta["family"] == "z-image" and back.tokens == tr.tokens
    assert back.do_cfg and back.guidance_scale == 4.0
    assert back.attention.layers == tr.attention.layers
    assert back.attention.names("layers") == tr.attention.layers
    torch.testing.assert_close(back.heatmap("cat"), tr.heatmap("cat"))
    torch.testing.assert_close(back.noise_uncond, tr.noise_uncond)
    torch.testing.assert_close(back.x0, tr.x0)


@pytest.mark.parametrize("cfg", [False, True])
def test_restored_after_an_exception_mid_run(cfg):
    pipe = bed()
    den = pipe.transformer
    before = (type(pipe), attention_processors(den), dict(den._forward_hooks),
              dict(den._forward_pre_hooks), torch.nn.functional.scaled_dot_product_attention)

    def stop(p, i, t, cb):
        if i == 1:
            raise KeyboardInterrupt
        return cb

    with pytest.raises(KeyboardInterrupt):
        with sdlens.trace(pipe):
            pipe(**kwargs(cfg), callback_on_step_end=stop)
    procs = attention_processors(den)
    assert type(pipe) is before[0] and procs.keys() == before[1].keys()
    assert all(procs[k] is before[1][k] for k in procs), "processor objects were not restored"
    assert dict(den._forward_hooks) == before[2] and dict(den._forward_pre_hooks) == before[3]
    assert torch.nn.functional.scaled_dot_product_attention is before[4]
    assert "step" not in vars(pipe.scheduler)
    assert torch.equal(pipe(**kwargs(cfg)).images, traced(cfg)[1])


def test_cfg_truncation_stops_recording_not_the_run():
    """``cfg_truncation`` drops the guidance (and half the batch) for later steps: one warning,
    no trace of that call, the same image."""
    pipe = bed()
    plain = pipe(**kwargs(True, cfg_truncation=0.1)).images
    with pytest.warns(UserWarning, match="sdlens: stopped recording"):
        with sdlens.trace(pipe) as tr:
            out = pipe(**kwargs(True, cfg_truncation=0.1)).images
    assert torch.equal(plain, out) and len(tr.runs) == 0


@pytest.mark.parametrize("cfg", [False, True])
def test_prompt_embeds_as_a_list_of_tensors(cfg):
    """Z-Image's ``prompt_embeds`` are a list, one (L_i, D) tensor per prompt (diffusers'
    ``test_encode_prompt_works_in_isolation`` passes them with no prompt): traced == untraced,
    the words not known."""
    pipe = bed()
    pos, neg = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=cfg)
    assert isinstance(pos, list) and torch.is_tensor(pos[0]) and pos[0].ndim == 2
    kw = lambda: kwargs(cfg, prompt=None, prompt_embeds=[t.clone() for t in pos],  # noqa: E731
                        negative_prompt_embeds=[t.clone() for t in neg] if cfg else None)
    plain = pipe(**kw()).images
    with sdlens.trace(pipe) as tr:
        out = pipe(**kw()).images
    tr = tr.runs[-1]
    assert torch.equal(plain, out) and tr.meta.get("words_unknown")
    assert tr.latents.shape == (STEPS + 1, 1, 16, 4, 4) and trace_words(tr) == []
