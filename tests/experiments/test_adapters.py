"""LoRA, textual inversion and SDXL base + refiner: traced, faithful, compared (issue 8).

Everything is built locally: LoRA adapters made with peft on the shipped model's UNet layout and
saved with diffusers' own ``save_lora_weights``, a textual-inversion file written by hand, and
shrunk random SDXL base / refiner pipelines.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

import diffusers  # noqa: E402
from sdlens.experiments import lora, textual_inversion  # noqa: E402
from sdlens.experiments.refiner import part, trace_base_refiner  # noqa: E402
from sdlens.analysis.compare import compare  # noqa: E402
from sdlens.engine.session import generate, trace  # noqa: E402
from sdlens.testing import random_pipeline  # noqa: E402
from sdlens.analysis.tokens import nearest_tokens, token_view  # noqa: E402
from sdlens.trace import load  # noqa: E402

PROMPT = "a red circle"
STEPS = 3
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _images(out) -> np.ndarray:
    return np.stack([np.asarray(i, dtype=np.float32) for i in out.images])


def _run(pipe, prompt=PROMPT, seed=0, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    return _images(pipe(prompt, generator=torch.Generator().manual_seed(seed), **kw))


def _traced_unchanged(pipe, prompt):
    """Trace ``prompt``; the traced image must equal the untraced one exactly. Returns the trace."""
    ref = _run(pipe, prompt)
    with trace(pipe) as tr:
        out = _run(pipe, prompt)
    assert np.abs(out - ref).max() == 0
    return tr


def _save_lora(unet, folder, adapter_unet=None) -> str:
    """Save the peft adapter of ``adapter_unet`` with diffusers' own LoRA save function."""
    from diffusers.utils import convert_state_dict_to_diffusers

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(adapter_unet))
    diffusers.StableDiffusionPipeline.save_lora_weights(str(folder), unet_lora_layers=state,
                                                        safe_serialization=True)
    assert os.path.exists(os.path.join(folder, "pytorch_lora_weights.safetensors"))
    return str(folder)


def _random_lora(unet, folder, seed=1) -> str:
    """A LoRA with random (non-zero) A and B on a copy of ``unet``, saved to ``folder``."""
    twin = copy.deepcopy(unet)
    twin.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS,
                                init_lora_weights="gaussian"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_B" in name:  # peft initialises B to zero (no effect): make it do something
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return _save_lora(unet, folder, twin)


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline("shapes")


@pytest.fixture(scope="module")
def base_trace(pipe):
    """Trace of the pipeline before any adapter is loaded."""
    return generate(pipe, PROMPT, seed=0, steps=STEPS)


@pytest.fixture(scope="module")
def lora_pipe(pipe, base_trace, tmp_path_factory):
    folder = _random_lora(pipe.unet, tmp_path_factory.mktemp("lora"))
    pipe.load_lora_weights(folder, adapter_name="rand")
    assert lora.lora_adapters(pipe) == {"rand": ["unet"]}
    return pipe


# ============================================================================ LoRA
def test_lora_traced_equals_untraced_at_scale_07(lora_pipe, base_trace):
    pipe = lora_pipe
    pipe.set_adapters("rand", 0.7)
    try:
        ref = _run(pipe)
        with trace(pipe) as tr:
            out = _run(pipe)
        assert np.abs(out - ref).max() == 0
        assert np.asarray(tr.images[0], dtype=np.float32).tolist() == ref[0].tolist()
        # the LoRA acts, and the recorded maps see it: at step 0 the latents are the same as
        # without LoRA, so different maps can only come from the LoRA'd to_q / to_k
        assert torch.equal(tr.latents[0], base_trace.latents[0])
        layer = tr.attention.layers[0]
        assert not torch.equal(tr.attention[layer][0], base_trace.attention[layer][0])
        assert compare(base_trace, tr).x0_rms[-1] > 1e-3
        # the recorded map of step 0 is the layer's softmax(q k^T) with the LoRA in q and k
        seen = {}
        attn = pipe.unet.get_submodule(layer)

        def grab(module, args, kwargs):
            seen.setdefault("x", (args[0], kwargs["encoder_hidden_states"]))

        h = attn.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            _run(pipe, num_inference_steps=STEPS)
        finally:
            h.remove()
        x, ehs = seen["x"]
        q = attn.to_q(x[1:]).view(1, -1, attn.heads, attn.to_q.out_features // attn.heads)
        k = attn.to_k(ehs[1:]).view(1, -1, attn.heads, attn.to_k.out_features // attn.heads)
        probs = torch.einsum("bqhd,bkhd->bhqk", q, k).mul(attn.scale).softmax(-1).mean(1)
        n_tok = tr.attention[layer].shape[2]
        want = probs[0, :, :n_tok].T.reshape(tr.attention[layer][0, 0].shape)
        torch.testing.assert_close(tr.attention[layer][0, 0].float(), want, atol=2e-3, rtol=0)
    finally:
        pipe.set_adapters("rand", 1.0)


def test_fused_lora_traced_equals_untraced(lora_pipe):
    pipe = lora_pipe
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.fuse_lora(lora_scale=0.7)
    try:
        ref = _run(pipe)
        with trace(pipe):
            out = _run(pipe)
        assert np.abs(out - ref).max() == 0
        with pytest.raises(ValueError, match="fused"):
            lora.lora_effect(pipe, PROMPT, "rand")
    finally:
        pipe.unfuse_lora()
        pipe.unet.load_state_dict(weights)  # unfusing subtracts the delta again: not bit-exact


def test_lora_scale_zero_is_the_same_trace_as_no_lora(lora_pipe, base_trace):
    pipe = lora_pipe
    pipe.set_adapters("rand", 0.0)
    try:
        tr = generate(pipe, PROMPT, seed=0, steps=STEPS)
    finally:
        pipe.set_adapters("rand", 1.0)
    for name in ("latents", "noise", "noise_uncond", "x0"):
        assert torch.equal(getattr(tr, name), getattr(base_trace, name)), name
    for layer in tr.attention.layers:
        assert torch.equal(tr.attention[layer], base_trace.attention[layer])
    c = compare(base_trace, tr)
    assert c.x0_rms.max() == 0 and c.latent_rms.max() == 0 and c.parting_step is None
    assert set(c.word_change) == {"a", "red", "circle"}
    assert all(v.max() == 0 for v in c.word_change.values())


def test_lora_effect_batched_equals_sequential_and_restores(lora_pipe, base_trace):
    from matplotlib.figure import Figure
    from peft.tuners.lora import LoraLayer

    pipe = lora_pipe
    pipe.set_adapters("rand", 0.3)
    layers = [m for m in pipe.unet.modules() if isinstance(m, LoraLayer)]
    before = [(list(m.active_adapters), dict(m.scaling)) for m in layers]
    eff = lora.lora_effect(pipe, PROMPT, "rand", scales=[0, 0.5, 1.0], seed=0, steps=STEPS)
    seq = lora.lora_effect(pipe, PROMPT, "rand", scales=[0, 0.5, 1.0], seed=0, steps=STEPS,
                               batched=False, figure=False)
    assert [(list(m.active_adapters), dict(m.scaling)) for m in layers] == before
    assert eff.batched and not seq.batched and eff.reference == 0.0
    traces, fig = eff
    assert isinstance(fig, Figure) and len(fig.axes) == 5
    assert [t.meta["lora"]["scale"] for t in traces] == [0.0, 0.5, 1.0]
    # batch item i of the batched call is bit for bit what diffusers' own batched call at
    # scales[i] gives (set_adapters, three identical prompts and seeds) ...
    for i, (s, a) in enumerate(zip(eff.scales, traces)):
        pipe.set_adapters("rand", s)
        plain = generate(pipe, [PROMPT] * 3, seed=[0] * 3, steps=STEPS)
        assert torch.equal(a.latents, plain.latents[:, i:i + 1]), s
        assert torch.equal(a.x0, plain.x0[:, i:i + 1]), s
        layer = a.attention.layers[-1]
        assert torch.equal(a.attention[layer], plain.attention[layer][:, i:i + 1])
    # ... and within the CPU's batch-size rounding of one call per scale
    for a, b in zip(traces, seq.traces):
        assert a.latents.shape == b.latents.shape == base_trace.latents.shape
        assert (a.latents - b.latents).abs().max() < 1e-2 * b.latents.abs().max()
    # each sequential run is what diffusers' own set_adapters gives at that scale
    for s, t in zip(seq.scales, seq.traces):
        pipe.set_adapters("rand", s)
        assert np.abs(_run(pipe) - np.asarray(t.images[0], dtype=np.float32)).max() == 0
    pipe.set_adapters("rand", 1.0)
    assert torch.equal(seq.traces[0].latents, base_trace.latents)
    # zero change at the reference, growing with the scale
    c0, c5, c1 = (eff.comparisons[s] for s in (0.0, 0.5, 1.0))
    assert c0.x0_rms.max() == 0 and all(v.max() == 0 for v in c0.word_change.values())
    assert 0 < c5.x0_rms[-1] < c1.x0_rms[-1]
    assert max(v.max() for v in c1.word_change.values()) > 0
    assert "scale 1.0" in eff.summary()


def test_unknown_adapter_names_give_clear_errors(lora_pipe, ti_pipe):
    with pytest.raises(ValueError, match=r"unknown LoRA adapter 'nope'; loaded adapters: 'rand'"):
        lora.lora_effect(lora_pipe, PROMPT, "nope")
    with pytest.raises(TypeError, match="name of a loaded LoRA adapter"):
        lora.lora_effect(lora_pipe, PROMPT, 3)
    with pytest.raises(ValueError, match="no LoRA adapters loaded"):
        lora.lora_effect(ti_pipe, PROMPT, "rand")  # a pipeline without LoRA
    with pytest.raises(ValueError, match="unknown textual-inversion token '<none>'"):
        textual_inversion.textual_inversion(ti_pipe, "<none>")


@pytest.mark.slow
def _train_red(unet, opt, sched, emb, alphas, vae, gen, steps: int = 40) -> None:
    """Train the LoRA so that the decoded x0's red channel rises (red minus green / blue)."""
    for _ in range(steps):
        t = sched.timesteps[torch.randint(len(sched.timesteps), (1,), generator=gen)].item()
        x = torch.randn(2, 4, 16, 16, generator=gen)
        eps_u, eps_t = unet(torch.cat([x, x]), t, encoder_hidden_states=emb.repeat_interleave(
            2, 0)).sample.chunk(2)
        eps = eps_u + 7.5 * (eps_t - eps_u)
        a = alphas[int(t)]
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        img = vae.decode(x0 / vae.config.scaling_factor).sample.clamp(-1, 1)
        loss = (img[:, 1:].mean() - img[:, 0].mean())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_trained_lora_turns_the_image_red(tmp_path):
    """A LoRA trained (80 optimizer steps) so the decoded image's red channel rises (red minus
    the mean of green and blue): at scale 1 the image is redder and compare() reports a change;
    at scale 0 the trace is the one without the LoRA and compare() reports zero change."""
    pipe = random_pipeline("shapes")
    no_lora = generate(pipe, PROMPT, seed=0, steps=4)
    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS,
                                init_lora_weights="gaussian"))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    assert params and all(p.requires_grad for p in params)
    opt = torch.optim.Adam(params, lr=3e-2)
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(4)
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    emb = torch.cat([uncond, cond])
    alphas = sched.alphas_cumprod
    gen = torch.Generator().manual_seed(0)
    vae = pipe.vae.requires_grad_(False)
    # one thread: the same float reductions, so the same LoRA, on any machine and OMP setting
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train_red(unet, opt, sched, emb, alphas, vae, gen, steps=80)
    finally:
        torch.set_num_threads(threads)
    folder = _save_lora(pipe.unet, tmp_path, unet)
    pipe.load_lora_weights(folder, adapter_name="red")
    eff = lora.lora_effect(pipe, PROMPT, "red", scales=[0, 1.0], seed=0, steps=4,
                               batched=False)

    def red(tr):
        im = np.asarray(tr.images[0], dtype=np.float32) / 255
        return float(im[..., 0].mean() - im[..., 1:].mean())

    r0, r1 = red(eff.traces[0]), red(eff.traces[1])
    # measured 0.101 -> 0.120 with OMP_NUM_THREADS 1 and 2 (the LoRA is trained on one thread, so
    # it is the same LoRA everywhere); the bar is a quarter of that rise, far above float noise
    assert r1 > r0 + 0.005, (r0, r1)
    assert red(no_lora) == r0
    c0 = compare(no_lora, eff.traces[0])
    c1 = compare(no_lora, eff.traces[1])
    assert c0.x0_rms.max() == 0 and max(v.max() for v in c0.word_change.values()) == 0
    assert c1.x0_rms[-1] > 1e-3
    assert max(v.max() for v in c1.word_change.values()) > 0
    assert eff.comparisons[1.0].x0_rms[-1] > 0


# ============================================================================ textual inversion
@pytest.fixture(scope="module")
def ti_pipe(tmp_path_factory):
    from safetensors.torch import save_file

    pipe = random_pipeline("shapes")
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    circle = pipe.tokenizer.convert_tokens_to_ids("circle</w>")
    folder = tmp_path_factory.mktemp("ti")
    one = table[circle][None] + 1e-3 * torch.randn(1, table.shape[1])  # close to "circle"
    save_file({"<my-token>": one.contiguous()}, str(folder / "one.safetensors"))
    two = torch.randn(2, table.shape[1]) * table.std()
    save_file({"<multi>": two.contiguous()}, str(folder / "two.safetensors"))
    pipe.load_textual_inversion(str(folder / "one.safetensors"))
    pipe.load_textual_inversion(str(folder / "two.safetensors"))
    return pipe


def test_textual_inversion_traced_named_and_heatmap(ti_pipe):
    pipe = ti_pipe
    prompt = "a <my-token> on a square"
    tr = _traced_unchanged(pipe, prompt)
    new_id = pipe.tokenizer.convert_tokens_to_ids("<my-token>")
    assert tr.token_ids[0] == pipe.tokenizer(prompt).input_ids
    assert new_id in tr.token_ids[0] and new_id >= pipe.tokenizer.vocab_size
    view = token_view(tr)
    assert [w.text for w in view.words] == ["a", "<my-token>", "on", "a", "square"]
    row = next(r for r in view.rows if r.id == new_id)
    assert row.word == "<my-token>" and row.text == "<my-token>" and row.position == 2
    hm = tr.heatmap("<my-token>", size=16)
    assert hm.shape == (16, 16) and torch.isfinite(hm).all() and hm.max() > hm.min()
    pos = tr.attention.token_index("<my-token>")
    assert pos == [2]
    layer = tr.attention.layers[0]
    assert not torch.equal(tr.attention[layer][:, 0, 2], tr.attention[layer][:, 0, 5])
    torch.testing.assert_close(textual_inversion.textual_inversion_heatmap(tr, "<my-token>", size=16), hm)
    # nearest vocabulary neighbours: the embedding was made next to "circle"
    ti = textual_inversion.textual_inversion(pipe, "<my-token>", k=5)
    assert ti.tokens == ["<my-token>"] and ti.ids == {1: [new_id]}
    assert ti.neighbours[1][0][0][0] == "circle" and ti.neighbours[1][0][0][2] > 0.99
    assert all(i < pipe.tokenizer.vocab_size for _, i, _ in ti.neighbours[1][0])
    assert ti.neighbours[1][0] == [n for n in nearest_tokens(pipe, "<my-token>", k=7)
                                   if n[1] < pipe.tokenizer.vocab_size][:5]
    tv = textual_inversion.textual_inversion_view(tr)
    assert list(tv.inversions) == ["<my-token>"]
    assert "circle" in str(tv) and "<my-token>" in str(tv)
    assert tv.to_dict()["textual_inversions"]["<my-token>"]["ids"] == {"1": [new_id]}


def test_multi_vector_textual_inversion_positions(ti_pipe):
    pipe = ti_pipe
    prompt = "a <multi> circle"
    assert textual_inversion.textual_inversion_tokens(pipe) == {"<my-token>": ["<my-token>"],
                                                       "<multi>": ["<multi>", "<multi>_1"]}
    tr = _traced_unchanged(pipe, prompt)
    # as the pipeline encodes it: <multi> expands to its two vectors
    assert tr.token_ids[0] == pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
                                             ).input_ids
    assert tr.tokens[0][1:-1] == ["a</w>", "<multi></w>", "<multi>_1</w>", "circle</w>"]
    assert tr.heatmap("circle", size=8).shape == (8, 8)
    both = textual_inversion.textual_inversion_heatmap(tr, "<multi>", size=8)
    from sdlens.analysis.heatmaps import token_heatmap

    torch.testing.assert_close(both, token_heatmap(tr, [2, 3], size=8))
    assert not torch.allclose(both, token_heatmap(tr, [2], size=8))
    # the trace's words see <multi> as one word over both vectors
    from sdlens.analysis.tokens import trace_words

    assert [(w.text, w.positions) for w in trace_words(tr)] == \
        [("a", (1,)), ("<multi>", (2, 3)), ("circle", (4,))]
    torch.testing.assert_close(tr.heatmap("<multi>", size=8), both)
    ti = textual_inversion.textual_inversion(pipe, "<multi>", k=3)
    assert len(ti.neighbours[1]) == 2 and all(len(n) == 3 for n in ti.neighbours[1])


def test_textual_inversion_on_sdxl_both_encoders():
    """SDXL: the token is loaded into both text encoders (as SDXL embeddings ship, clip_l +
    clip_g); tracing keeps the image, the trace's tokens (tokenizer 1) hold it as one word and
    its heatmap is a real map."""
    from sdlens.analysis.tokens import trace_words

    pipe = random_pipeline("sdxl")
    for enc, tok in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):
        table = enc.get_input_embeddings().weight.detach()
        vec = torch.randn(1, table.shape[1], generator=torch.Generator().manual_seed(1)) * table.std()
        pipe.load_textual_inversion(vec, token="<xl-token>", text_encoder=enc, tokenizer=tok)
    prompt = "a <xl-token> on a square"
    tr = _traced_unchanged(pipe, prompt)
    new_id = pipe.tokenizer.convert_tokens_to_ids("<xl-token>")
    assert new_id >= pipe.tokenizer.vocab_size and new_id in tr.token_ids[0]
    assert "<xl-token>" in [w.text for w in trace_words(tr)]
    m = tr.heatmap("<xl-token>", size=8)
    assert m.shape == (8, 8) and torch.isfinite(m).all() and float(m.sum()) > 0


# ============================================================================ SDXL refiner
@pytest.mark.slow
def test_sdxl_base_and_refiner_as_one_trace(tmp_path):
    base = random_pipeline("sdxl")
    refiner = random_pipeline("sdxl-refiner", seed=1)
    assert refiner.tokenizer is None and refiner.text_encoder is None
    assert type(refiner).__name__ == "StableDiffusionXLImg2ImgPipeline"
    assert refiner.unet.config.cross_attention_dim == refiner.text_encoder_2.config.hidden_size
    steps, handover = 5, 0.6
    g = torch.Generator().manual_seed(0)
    lat = base(PROMPT, num_inference_steps=steps, denoising_end=handover, output_type="latent",
               generator=g).images
    ref = _images(refiner(PROMPT, num_inference_steps=steps, denoising_start=handover,
                          image=lat, generator=g))

    tr = trace_base_refiner(base, refiner, PROMPT, seed=0, steps=steps,
                                     handover=handover)
    assert np.abs(np.asarray(tr.images[0], dtype=np.float32) - ref[0]).max() == 0
    h = tr.meta["handover_step"]
    assert h == 3 and tr.num_steps == steps and tr.meta["handover"] == handover
    assert tr.latents.shape[0] == steps + 1 and tr.x0.shape[0] == steps
    assert tr.meta["handover_latent_gap"] == 0
    base.scheduler.set_timesteps(steps)
    assert tr.timesteps.tolist() == base.scheduler.timesteps.float().tolist()
    assert [p["name"] for p in tr.meta["parts"]] == ["base", "refiner"]
    b, r = part(tr, "base"), part(tr, "refiner")
    assert b.num_steps == h and r.num_steps == steps - h and r.meta["step_offset"] == h
    assert torch.equal(r.latents[0], b.latents[-1]) and torch.equal(r.latents, tr.latents[h:])
    assert r.tokens[0][1:-1] == refiner.tokenizer_2.tokenize(PROMPT)
    assert r.meta["family"] == "sdxl-refiner" and r.meta["pipeline_class"] == \
        "StableDiffusionXLImg2ImgPipeline"
    assert tr.attention.steps == list(range(h)) and r.attention.steps == list(range(steps - h))
    assert set(r.attention.layers) != set(b.attention.layers)
    assert r.heatmap("circle", size=8).shape == (8, 8)
    assert b.heatmap("circle", size=8).shape == (8, 8)
    with pytest.raises(ValueError, match="unknown part"):
        part(tr, "middle")
    # one file
    path = tr.save(tmp_path / "whole.sdlens")
    back = load(path)
    assert back.meta["handover_step"] == h and torch.equal(back.latents, tr.latents)
    rb = part(back, "refiner")
    for layer in r.attention.layers:
        assert torch.equal(rb.attention[layer], r.attention[layer])
    assert rb.tokens == r.tokens
    with pytest.raises(ValueError, match="handover"):
        trace_base_refiner(base, refiner, PROMPT, handover=1.0)
