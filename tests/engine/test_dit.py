"""Cross-attention diffusion transformers (PixArt-Σ, Sana) traced through their adapters
(random weights, CPU fp32, 2-3 steps)."""

from __future__ import annotations

import functools

import pytest
import torch

import sdlens
from sdlens.analysis.tokens import find_word, token_view, tokenize, word_texts, words_from_tokens
from sdlens.engine.arch import adapter_for, naming_for
from sdlens.engine.arch.dit import PixArtAdapter, SanaAdapter
from sdlens.engine.text import word_positions
from pipelines import assert_restored, pipe_state
from sdlens.testing import gemma_tokenizer, random_pipeline, t5_tokenizer

PROMPT = "A red circle on the beach"
ARCHS = ("pixart", "sana")
STEPS = 3


@functools.lru_cache(maxsize=None)
def pipe_of(arch: str):
    return random_pipeline(arch, seed=0)


def call_kwargs(arch: str, **kw) -> dict:
    kw.setdefault("num_inference_steps", STEPS)
    kw.setdefault("output_type", "np")
    kw.setdefault("prompt", PROMPT)
    kw.setdefault("use_resolution_binning", False)  # the test beds' 8x8 latents are no bin
    kw.setdefault("clean_caption", False)  # it needs bs4 / ftfy; without them it is off anyway
    if arch == "sana":  # SanaPipeline defaults to 1024 px whatever the transformer's sample size
        kw.setdefault("height", 32)
        kw.setdefault("width", 32)
    return kw


def run(pipe, arch, seed=0, **kw):
    return pipe(generator=torch.Generator().manual_seed(seed), **call_kwargs(arch, **kw)).images


@functools.lru_cache(maxsize=None)
def traced(arch: str, keep_padding: bool = False):
    pipe = pipe_of(arch)
    # float16 maps: the tests below check sums over tokens at its precision
    with sdlens.trace(pipe, keep_padding=keep_padding, attention_dtype=torch.float16) as tr:
        images = run(pipe, arch)
    return tr.runs[-1], images


# ---------------------------------------------------------------- adapters and naming
@pytest.mark.parametrize("arch,cls,family", [("pixart", PixArtAdapter, "pixart"),
                                             ("sana", SanaAdapter, "sana")])
def test_adapter_sites_and_naming(arch, cls, family):
    pipe = pipe_of(arch)
    adapter = adapter_for(pipe)
    assert type(adapter) is cls and adapter.family() == family
    n = pipe.transformer.config.num_layers
    assert adapter.sites() == [f"transformer_blocks.{i}.attn2" for i in range(n)]
    p = pipe.transformer.config.patch_size
    assert set(adapter.resolutions((8, 8)).values()) == {(8 // p, 8 // p)}
    naming = naming_for(family)
    assert naming.alias("transformer_blocks.1.attn2") == "block.1"
    assert naming.expand("block.1") == naming.expand("1") == "transformer_blocks.1"
    assert naming.group("transformer_blocks.0.attn2") == "blocks"


# ---------------------------------------------------------------- the run
@pytest.mark.parametrize("arch", ARCHS)
def test_traced_image_equals_untraced(arch):
    pipe = pipe_of(arch)
    ref = run(pipe, arch)
    tr, images = traced(arch)
    assert (images == ref).all()
    assert len(tr.images) == 1


@pytest.mark.parametrize("arch", ARCHS)
def test_guidance_identity_and_shapes(arch):
    pipe = pipe_of(arch)
    tr, _ = traced(arch)
    c = pipe.transformer.config.in_channels  # PixArt predicts 2C channels (learned sigma)
    assert tr.latents.shape == (STEPS + 1, 1, c, 8, 8)
    assert tr.noise.shape == tr.noise_uncond.shape == tr.noise_text.shape == (STEPS, 1, c, 8, 8)
    g = tr.guidance_scale
    assert g > 1 and tr.do_cfg
    guided = tr.noise_uncond + g * (tr.noise_text - tr.noise_uncond)
    torch.testing.assert_close(tr.noise, guided, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_last_x0_is_final_latents(arch):
    tr, _ = traced(arch)
    assert tr.x0 is not None
    torch.testing.assert_close(tr.x0[-1], tr.latents[-1], atol=1e-5, rtol=1e-5)


def test_sana_flow_x0_matches_dpm_solver():
    """x0 of every step (the flow row: x - sigma v) equals the x0 DPM-Solver (flow sigmas,
    flow_prediction) converted the velocity to."""
    pipe = pipe_of("sana")
    own = []

    def grab(p, i, t, kw):
        own.append(p.scheduler.model_outputs[-1].clone())
        return kw

    with sdlens.trace(pipe) as tr:
        run(pipe, "sana", callback_on_step_end=grab)
    assert tr.meta["prediction_type"] == tr.prediction_type == "flow"  # a velocity, however named
    torch.testing.assert_close(tr.x0, torch.stack(own), atol=1e-5, rtol=1e-5)


def test_sana_flow_match_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = pipe_of("sana")
    saved = pipe.scheduler
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    try:
        ref = run(pipe, "sana")
        with sdlens.trace(pipe) as tr:
            images = run(pipe, "sana")
    finally:
        pipe.scheduler = saved
    assert (images == ref).all()
    sigmas = tr.sigmas
    x = tr.latents[:-1]
    torch.testing.assert_close(tr.x0, x - sigmas[:, None, None, None, None] * tr.noise,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tr.x0[-1], tr.latents[-1], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- attention and tokens
def _encoded_ids(pipe, arch, **kw):
    """The ids the text encoder saw for the prompt (padding dropped), as the pipeline laid
    them out (Sana: instruction tail kept)."""
    seen = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        seen.append((ids, mask))

    handle = pipe.text_encoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run(pipe, arch, guidance_scale=1.0, **kw)
    finally:
        handle.remove()
    ids, mask = seen[0]
    if arch == "sana" and ids.shape[1] > 300:  # instruction: token 0 and the last 299 kept
        keep = [0] + list(range(ids.shape[1] - 299, ids.shape[1]))
        ids, mask = ids[:, keep], mask[:, keep]
    return [int(i) for i, m in zip(ids[0], mask[0]) if m]


@pytest.mark.parametrize("arch", ARCHS)
def test_tokens_line_up_with_the_text_axis(arch):
    pipe = pipe_of(arch)
    tr, _ = traced(arch)
    assert tr.token_ids[0] == _encoded_ids(pipe, arch)
    assert tr.meta["text_length"] == 300
    assert token_view(tr).limit == 299  # less T5's </s> / Gemma's <bos>
    maps = tr.attention
    n = pipe.transformer.config.num_layers
    p = pipe.transformer.config.patch_size
    assert len(maps.layers) == n
    for layer in maps.layers:
        assert maps[layer].shape == (STEPS, 1, len(tr.tokens[0]), 8 // p, 8 // p)
        # padding is masked: the prompt's positions hold all the attention
        total = maps[layer].float().sum(dim=2)
        torch.testing.assert_close(total, torch.ones_like(total), atol=2e-3, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_keep_padding_keeps_300_positions(arch):
    tr, _ = traced(arch, keep_padding=True)
    n = len(tr.tokens[0])
    for layer in tr.attention.layers:
        m = tr.attention[layer]
        assert m.shape[2] == 300
        assert m[:, :, n:].float().abs().max() < 1e-3  # masked padding gets (almost) nothing


@pytest.mark.parametrize("arch", ARCHS)
def test_heatmap_of_every_word(arch):
    tr, images = traced(arch)
    words = word_texts(tr)
    assert {"red", "circle", "beach"} <= set(words)
    for w in words:
        hm = tr.heatmap(w)
        assert tuple(hm.shape) == images.shape[1:3]
        assert torch.isfinite(hm).all()
    with pytest.raises(ValueError) as err:
        tr.heatmap("zebra")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch, tmp_path):
    tr, _ = traced(arch)
    path = tmp_path / f"{arch}.sdlens"
    tr.save(path)
    back = sdlens.load(path)
    assert back.tokens == tr.tokens and back.token_ids == tr.token_ids
    assert back.meta["family"] == arch
    assert back.attention.alias(back.attention.layers[1]) == "block.1"
    torch.testing.assert_close(back.x0, tr.x0)
    torch.testing.assert_close(back.heatmap("red"), tr.heatmap("red"))


@pytest.mark.parametrize("arch", ARCHS)
def test_restored_after_exception(arch):
    pipe = pipe_of(arch)
    before = pipe_state(pipe)

    def boom(*args):
        if args[-3 if arch == "pixart" else 1] == 1:
            raise RuntimeError("stop")
        return args[-1]

    # PixArt's pipeline has the old ``callback(i, t, latents)``, Sana's callback_on_step_end
    callback = {"callback": boom} if arch == "pixart" else {"callback_on_step_end": boom}
    with pytest.raises(RuntimeError, match="stop"):
        with sdlens.trace(pipe):
            run(pipe, arch, **callback)
    assert_restored(pipe, before)


# ---------------------------------------------------------------- SentencePiece words
def test_sentencepiece_words_t5_and_gemma():
    t5 = tokenize("a red circle", t5_tokenizer())
    assert t5.tokens[-1] == "</s>" and t5.tokens[0].startswith("\u2581")
    assert [w.text for w in t5.words] == ["a", "red", "circle"]
    gemma = tokenize("a red circle", gemma_tokenizer())
    assert gemma.tokens[0] == "<bos>" and "</s>" not in gemma.tokens
    assert [w.text for w in gemma.words] == ["a", "red", "circle"]
    # pieces without "▁" continue a word; specials and padding belong to none
    words = words_from_tokens(["<bos>", "a", "\u2581r", "ed", "\u2581circle", "</s>", "<pad>"])
    assert [(w.text, w.positions) for w in words] == [("a", (1,)), ("red", (2, 3)),
                                                       ("circle", (4,))]


def test_t5_limit_cuts_words():
    view = tokenize(" ".join(["red"] * 20), t5_tokenizer(), limit=8)
    assert len(view.tokens) == 8 and view.tokens[-1] == "</s>"
    assert view.n_prompt_tokens == 7 and view.truncated_words


@pytest.mark.parametrize("qk_norm", [None, "rms_norm_across_heads"])
def test_recorded_probabilities_reproduce_sana_cross_attention(qk_norm):
    """probs @ values through the output projection is the processor's own output (with the
    padding mask, and with Sana 1.5's across-heads q/k norm)."""
    from diffusers import SanaTransformer2DModel

    from sdlens.engine import kernel
    from sdlens.engine.sites import segment_probabilities

    torch.manual_seed(0)
    t = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                               attention_head_dim=8, num_layers=1, num_cross_attention_heads=2,
                               cross_attention_head_dim=8, cross_attention_dim=16,
                               caption_channels=16, sample_size=4, qk_norm=qk_norm).eval()
    attn = t.transformer_blocks[0].attn2
    hs, ehs = torch.randn(2, 16, 16), torch.randn(2, 5, 16)
    mask = (1 - torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]]).float())[:, None] * -10000.0
    seen = []
    tap = kernel.Tap(lambda call, out: seen.append(call) or out, lambda q, k, i: False)
    with torch.no_grad():
        ref = attn(hs, encoder_hidden_states=ehs, attention_mask=mask)
        with kernel.installed(), kernel.tapping(tap):
            again = attn(hs, encoder_hidden_states=ehs, attention_mask=mask)
        call = seen[0]  # the kernel's q / k / v / mask, after the processor's norms
        probs = segment_probabilities(call, slice(None), slice(0, 16), slice(0, 5), None, False)
        probs = probs.transpose(-1, -2)  # (n, heads, HW, K)
        out = attn.to_out[0](torch.einsum("nhqk,nhkd->nqhd", probs, call.value.float()).flatten(2))
    assert torch.equal(again, ref) and len(seen) == 1
    assert probs[0, :, :, 3:].max() < 1e-4
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_sana_without_instruction_and_a_batch():
    """complex_human_instruction=None: the prompt's own Gemma tokens; two prompts of different
    lengths: the shorter one's padding positions get no attention."""
    pipe = pipe_of("sana")
    assert tokenize("a red circle", pipe).tokens[0] == "<bos>"
    prompts = ["a red circle", "a small blue square on the beach, highly detailed."]
    with sdlens.trace(pipe, attention_dtype=torch.float16) as tr:  # sums checked below
        run(pipe, "sana", prompt=prompts, complex_human_instruction=None)
    for b, p in enumerate(prompts):
        assert tr.token_ids[b] == _encoded_ids(pipe, "sana", prompt=p,
                                               complex_human_instruction=None)
    n0 = len(tr.token_ids[0])
    m = tr.attention[tr.attention.layers[0]].float()
    assert m.shape[2] == len(tr.token_ids[1]) > n0
    assert m[:, 0, n0:].max() < 1e-3
    torch.testing.assert_close(m.sum(dim=2), torch.ones_like(m.sum(dim=2)), atol=2e-3, rtol=0)
    assert tr.heatmap("square", batch=1).shape == (32, 32)


@pytest.mark.parametrize("arch", ARCHS)
def test_reweight_on_the_cross_attention(arch):
    """The equalizer (engine/sites.py's Reweight) on the DiT sites: a weight of 1 changes
    nothing, bit for bit; another weight changes the result."""
    pipe = pipe_of(arch)
    kw = call_kwargs(arch)
    kw.pop("prompt"), kw.pop("num_inference_steps")
    base = sdlens.generate(pipe, PROMPT, seed=0, steps=2, **kw)
    one = sdlens.generate(pipe, PROMPT, seed=0, steps=2, reweight={"circle": 1.0}, **kw)
    three = sdlens.generate(pipe, PROMPT, seed=0, steps=2, reweight={"circle": 3.0}, **kw)
    assert torch.equal(base.latents, one.latents)
    assert not torch.equal(base.latents, three.latents)
    # steering finds a word where the trace's text axis has it (Sana: instruction layout)
    tr, _ = traced(arch)
    for w in ("red", "circle", "beach"):
        assert word_positions(pipe, PROMPT, w) == list(find_word(tr, w).positions)


def test_pixart_alpha_pipeline():
    """PixArtAlphaPipeline (same transformer class; 120 text tokens by default)."""
    from diffusers import PixArtAlphaPipeline

    alpha = PixArtAlphaPipeline(**pipe_of("pixart").components)
    alpha.set_progress_bar_config(disable=True)
    ref = run(alpha, "pixart", num_inference_steps=2)
    with sdlens.trace(alpha) as tr:
        images = run(alpha, "pixart", num_inference_steps=2)
    assert (images == ref).all()
    assert tr.meta["family"] == "pixart" and tr.meta["text_length"] == 120
    assert tr.tokens[0][-1] == "</s>" and len(tr.attention.layers) == 2
