"""Token steering: the reweighting processor (exact maths, weight 1 is a bitwise no-op, step
ranges, hooks restored), reweight() traces, and word ablation (batched == single runs)."""

import numpy as np
import pytest
import torch

from sdlens.engine.text import word_positions
from sdlens.engine.sites import Hooks, KernelSeam, Reweight, SiteProcessor, reweighting
from sdlens.experiments import steer
from sdlens.pipeline import SHIPPED_MODEL
from sdlens.testing import random_pipeline

P = "a red circle and a blue square"
ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline("sd15", seed=2)


def run(pipe, prompt=P, seed=0, steps=4, g=7.5, **kw):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), guidance_scale=g,
                num_inference_steps=steps, output_type="np", **kw).images[0]


# ----------------------------------------------------------------------------- the processor
def test_processor_is_the_equalizer():
    """(P * w) V through to_out, computed explicitly, equals the processor's output."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = random_pipeline("sd15", seed=3).unet
    name, attn = next((n, m) for n, m in unet.named_modules() if n.endswith("attn2"))
    torch.manual_seed(0)
    hs = torch.randn(4, 16, attn.to_q.in_features)
    ehs = torch.randn(4, 77, attn.to_k.in_features)
    factors = torch.ones(2, 77)
    factors[0, 2], factors[0, 3], factors[1, 5] = 3.0, 0.25, 0.0
    editor = Reweight(factors, [2, 3, 5])
    with torch.no_grad(), Hooks() as hooks:
        KernelSeam(None).install(hooks)  # the kernel wrapper; plain cross-attention layout
        got = SiteProcessor(AttnProcessor2_0(), name, editors=[editor])(attn, hs,
                                                                       encoder_hidden_states=ehs)
        plain = AttnProcessor2_0()(attn, hs, encoder_hidden_states=ehs)
        # explicit: softmax, multiply the columns, no renormalisation, values, to_out
        h = attn.heads
        q = attn.to_q(hs).view(4, 16, h, -1).transpose(1, 2)
        k = attn.to_k(ehs).view(4, 77, h, -1).transpose(1, 2)
        v = attn.to_v(ehs).view(4, 77, h, -1).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)
        w = torch.cat([torch.ones(2, 77), factors])  # uncond half untouched, text half steered
        out = (probs * w[:, None, None, :]) @ v
        want = attn.to_out[0](out.transpose(1, 2).reshape(4, 16, -1)) / attn.rescale_output_factor
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[:2], plain[:2])  # the unconditional rows are bit-identical
    assert (got[2:] - plain[2:]).abs().max() > 1e-3


def test_weight_one_is_a_bitwise_noop(pipe):
    base = run(pipe)
    with reweighting(pipe, P, {"red": 1.0, "circle": 1.0, "square": 1.0}) as state:
        same = run(pipe)
    assert state.positions == [2, 3, 7] and state.calls > 0  # the processor did run
    assert np.array_equal(base, same)


def test_reweight_changes_the_image_within_its_steps(pipe):
    base = run(pipe, steps=6)
    n_layers = sum(1 for k in pipe.unet.attn_processors if ".attn2." in k)
    with reweighting(pipe, P, {"red": 4.0}) as state:
        all_steps = run(pipe, steps=6)
    assert np.abs(all_steps - base).max() > 1e-2
    calls_all = state.calls
    with reweighting(pipe, P, {"red": 4.0}, steps=(3, None)) as state:
        late = run(pipe, steps=6)
    assert state.calls * 2 > calls_all > state.calls > 0  # fewer steps steered
    assert 0 < np.abs(late - base).max() < np.abs(all_steps - base).max()
    with reweighting(pipe, P, {"red": 4.0}, steps=(0.0, 0.5)) as state:
        run(pipe, steps=6)
    assert state.calls == n_layers * (state.total // 2) or state.calls == n_layers * round(state.total / 2)
    with reweighting(pipe, P, {"red": 4.0}, steps=(50, None)) as state:
        never = run(pipe, steps=6)
    assert state.calls == 0 and np.array_equal(never, base)


def test_reweighting_restores_processors_and_hooks_on_errors(pipe):
    procs = dict(pipe.unet.attn_processors)
    pre = dict(pipe.unet._forward_pre_hooks)
    def boom(pipe, i, t, kwargs):
        raise KeyboardInterrupt  # the user stops the run half-way

    with pytest.raises(KeyboardInterrupt):
        with reweighting(pipe, P, {"red": 2.0}) as state:
            assert any(isinstance(p, SiteProcessor) and p.editors == (state,)
                       for p in pipe.unet.attn_processors.values())
            run(pipe, callback_on_step_end=boom)
    assert state.calls > 0
    after = pipe.unet.attn_processors
    assert all(after[k] is procs[k] for k in procs)
    assert dict(pipe.unet._forward_pre_hooks) == pre


def test_hooks_restore_everything_after_an_exception_in_the_block(pipe):
    """The one installer: processors, forward hooks, forward pre-hooks and undo steps all come
    off when the block raises (in reverse order), and the processor objects are the saved ones."""
    unet = pipe.unet
    procs = dict(unet.attn_processors)
    fwd, pre = dict(unet._forward_hooks), dict(unet._forward_pre_hooks)
    emb = pipe.text_encoder.get_input_embeddings()
    emb_fwd = dict(emb._forward_hooks)
    sites = list(procs)[:2]
    layers = [k[: -len(".processor")] for k in sites]
    undone = []
    with pytest.raises(RuntimeError, match="boom"):
        with Hooks() as hooks:
            wrapped = hooks.wrap_sites(unet, layers)
            hooks.forward_hook(unet, lambda *a: None)
            hooks.forward_pre_hook(unet, lambda *a, **k: None, with_kwargs=True)
            hooks.forward_hook(emb, lambda *a: None)
            hooks.undo(lambda: undone.append(len(unet._forward_hooks)))
            assert [unet.attn_processors[k] for k in sites] == [wrapped[l] for l in layers]
            assert all(unet.attn_processors[k] is procs[k] for k in procs if k not in sites)
            raise RuntimeError("boom")
    after = unet.attn_processors
    assert all(after[k] is procs[k] for k in procs)
    assert dict(unet._forward_hooks) == fwd and dict(unet._forward_pre_hooks) == pre
    assert dict(emb._forward_hooks) == emb_fwd
    assert undone == [len(fwd) + 1]  # reverse order: the undo step ran before the hooks came off
    with pytest.raises(ValueError, match="no attention processor"):
        with Hooks() as hooks:
            hooks.wrap_sites(unet, ["not.a.layer"])
    assert all(unet.attn_processors[k] is procs[k] for k in procs)


def test_words_and_errors(pipe):
    tok = pipe  # positions as the pipeline lays its text out
    assert word_positions(tok, P, "red") == [2]
    assert word_positions(tok, P, "a") == [1, 5]  # every occurrence
    assert word_positions(tok, P, "blue square") == [6, 7]
    assert word_positions(tok, "A Red, circle", "red") == [2]
    assert word_positions(tok, "a dreambeach", "dreambeach") == [2, 3]  # two sub-word tokens
    assert word_positions(tok, P, 4) == [4]
    with pytest.raises(ValueError, match=r"'purple' is not a word .*'red', 'circle'"):
        with reweighting(pipe, P, {"purple": 2.0}):
            pass
    with pytest.raises(ValueError, match="outside"):
        word_positions(tok, P, 40)
    with pytest.raises(ValueError, match="at least one"):
        with reweighting(pipe, P, {}):
            pass
    for bad in [5, (3, 1), (0.5, 2.0), ("a", 3)]:
        with pytest.raises(ValueError, match="steps"):
            with reweighting(pipe, P, {"red": 2.0}, steps=bad):
                pass
    long = " ".join(["word"] * 80) + " red"
    with pytest.raises(ValueError, match="77-token limit"):
        word_positions(tok, long, "red")


def test_reweight_returns_a_traced_run(pipe):
    steered, original = steer.reweight(pipe, P, {"red": 3.0}, reweight_steps=(0, 2), seed=1,
                                       steps=4, baseline=True)
    assert steered.meta["reweight"] == {"weights": {"red": 3.0}, "steps": [0, 2], "positions": [2],
                                        "renormalised": False}
    assert "reweight" not in original.meta
    a, b = np.asarray(steered.images[0], float), np.asarray(original.images[0], float)
    assert np.abs(a - b).max() > 0
    with reweighting(pipe, P, {"red": 3.0}, steps=(0, 2)):
        direct = run(pipe, seed=1, steps=4)
    assert np.abs(np.asarray(steered.images[0], float) / 255 - direct).max() <= 1 / 255 + 1e-6
    assert steered.latents is not None and steered.attention is not None


# ----------------------------------------------------------------------------- ablation
def test_token_effects_remove_equals_single_runs(pipe):
    fx = steer.token_effects(pipe, P, seed=3, steps=4, record=None)
    words = P.split()
    assert fx.words == ["a", "red", "circle", "and", "a#2", "blue", "square"]
    np.testing.assert_allclose(fx.image, run(pipe, seed=3), atol=ATOL, rtol=0)
    for i, w in enumerate(["red", "and", "a#2"]):
        k = fx.words.index(w)
        ref = run(pipe, " ".join(words[:k] + words[k + 1:]), seed=3)
        np.testing.assert_allclose(fx.ablated[w], ref, atol=ATOL, rtol=0)
        diff = np.abs(ref - fx.image).mean(-1)
        np.testing.assert_allclose(fx.maps[w], diff, atol=ATOL)
        assert fx.effects[w] == pytest.approx(float(fx.maps[w].mean()))
    assert fx.maps["red"].shape == fx.image.shape[:2]
    assert all(v > 0 for v in fx.effects.values())
    assert fx.ranked()[0][1] == max(fx.effects.values())


def test_token_effects_pad_equals_padded_embeddings(pipe):
    fx = steer.token_effects(pipe, P, seed=0, steps=4, mode="pad", words=["red", "square"],
                             record="light")
    assert fx.words == ["red", "square"]
    tok = pipe.tokenizer
    for w, pos in (("red", 2), ("square", 7)):
        ids = tok(P, padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids
        ids[0, pos] = tok.pad_token_id
        with torch.no_grad():
            emb = pipe.text_encoder(ids)[0]
        ref = pipe(prompt_embeds=emb, generator=torch.Generator().manual_seed(0),
                   num_inference_steps=4, output_type="np").images[0]
        np.testing.assert_allclose(fx.ablated[w], ref, atol=ATOL, rtol=0)
        assert fx.traces[w].prompts == [P] and fx.traces[w].latents is not None
    assert fx.trace.prompts == [P]
    import matplotlib

    matplotlib.use("Agg")
    fig = fx.plot()
    assert [ax.get_title() for ax in fig.axes][:3] == ["original", "padded 'red'", "padded 'square'"]


def test_token_effects_errors(pipe):
    with pytest.raises(ValueError, match="'purple'.*not in the prompt"):
        steer.token_effects(pipe, P, words=["purple"], steps=2, record=None)
    with pytest.raises(ValueError, match="mode"):
        steer.token_effects(pipe, P, mode="zero", steps=2, record=None)


# ----------------------------------------------------------------------------- shipped model
SHIPPED = SHIPPED_MODEL
needs_model = pytest.mark.skipif(not (SHIPPED / "model_index.json").exists(),
                                 reason="shipped weights not built yet")


@pytest.fixture(scope="module")
def shapes():
    from sdlens.pipeline import load_pipeline

    return load_pipeline(device="cpu")


def share(image, colour):
    """Fraction of the image's pixels that are ``colour`` (float [0, 1] arrays or PIL images)."""
    from sdlens.models.shapes.evaluate import colour_segments

    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = np.clip(img * 255, 0, 255).round().astype(np.uint8)
    return float(colour_segments(img)[colour].mean())


@needs_model
def test_shipped_raising_a_colour_weight_increases_its_pixel_share(shapes):
    # measured (6 seeds, 20 steps, CFG 7.5; the refined model): blue share 0.121 at weight 1,
    # 0.143 at 1.5, 0.083 at 0.5 (0.048 at 0.25, 0 at 0). On the earlier weights, large weights
    # (3.0) pushed the features off the training distribution and the blue square dissolved
    # (share -> 0.01): without renormalisation, steer with weights near 1.
    prompt = "a red circle and a blue square"
    seeds = list(range(6))
    kw = dict(seed=seeds, steps=20, guidance_scale=7.5, record=("latents",))
    up, base = steer.reweight(shapes, [prompt] * len(seeds), {"blue": 1.5}, baseline=True, **kw)
    down = steer.reweight(shapes, [prompt] * len(seeds), {"blue": 0.5}, **kw)
    before = np.mean([share(im, "blue") for im in base.images])
    after = np.mean([share(im, "blue") for im in up.images])
    lower = np.mean([share(im, "blue") for im in down.images])
    assert after > before + 0.008, (before, after)
    assert lower < 0.8 * before, (before, lower)


@needs_model
def test_shipped_ablating_the_colour_word_changes_the_colour(shapes):
    # measured (5,700-step model): effects a 0.125, red 0.102, circle 0.013. Removing "a" moves
    # every later word up one position, which changes the image as much as a missing colour.
    fx = steer.token_effects(shapes, "a red circle", seed=0, steps=20, record=None)
    assert share(fx.image, "red") > 0.03
    assert share(fx.ablated["red"], "red") < 0.3 * share(fx.image, "red")
    assert fx.effects["red"] > 3 * fx.effects["circle"]


@needs_model
def test_shipped_ablating_an_absent_word_changes_little(shapes):
    # "photo" is no word of the shapes grammar: nothing in the image comes from it
    # (measured: effect 0.0023 against 0.109 for "red")
    fx = steer.token_effects(shapes, "a red circle photo", seed=0, steps=20, record=None)
    assert fx.effects["photo"] < 0.1 * fx.effects["red"]
    assert share(fx.ablated["photo"], "red") > 0.5 * share(fx.image, "red")


def test_generate_takes_reweight_like_steer_reweight():
    import sdlens
    from sdlens.testing import random_pipeline

    pipe = random_pipeline("sd15")
    plain = sdlens.generate(pipe, "a red circle", seed=0, steps=3, guidance_scale=5.0)
    same = sdlens.generate(pipe, "a red circle", seed=0, steps=3, guidance_scale=5.0,
                           reweight={"red": 1.0})
    steered = sdlens.generate(pipe, "a red circle", seed=0, steps=3, guidance_scale=5.0,
                              reweight={"red": 4.0}, reweight_steps=(0, 2))
    assert same.meta["reweight"]["weights"] == {"red": 1.0}
    assert torch.equal(plain.latents, same.latents)
    assert not torch.equal(plain.latents, steered.latents)
    with pytest.raises(ValueError, match="words"):
        sdlens.generate(pipe, "a red circle", seed=0, steps=2, reweight={"purple": 2.0})
    with pytest.raises(ValueError, match="reweight="):
        sdlens.generate(pipe, "a red circle", seed=0, steps=2, reweight_steps=(0, 1))


# ----------------------------------------------------------------------------- joint attention
@pytest.fixture(scope="module")
def sd3():
    return random_pipeline("sd3", seed=0)


def test_joint_processor_is_the_equalizer_on_the_text_columns():
    """On SD3.5's joint attention: the image queries' probabilities on the chosen text tokens
    (columns of the one softmax over [image; text] keys) times the weights, no renormalisation;
    the text stream's output is untouched."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from sdlens.engine.arch import adapter_for
    from sdlens.engine.sites import KernelSeam

    pipe = random_pipeline("sd35", seed=0)
    attn = pipe.transformer.transformer_blocks[0].attn
    torch.manual_seed(0)
    dim = attn.to_q.in_features
    hs, ehs = torch.randn(4, 16, dim), torch.randn(4, 10, dim)
    factors = torch.ones(2, 77)
    factors[0, 2], factors[0, 3], factors[1, 5] = 3.0, 0.25, 0.0
    editor = Reweight(factors, [2, 3, 5])
    seam = KernelSeam(adapter_for(pipe))  # the family's layout: [image; text]
    with torch.no_grad(), Hooks() as hooks:
        seam.install(hooks)
        got = SiteProcessor(JointAttnProcessor2_0(), "transformer_blocks.0.attn",
                            editors=[editor], seam=seam)(attn, hs, encoder_hidden_states=ehs)
        plain = JointAttnProcessor2_0()(attn, hs, encoder_hidden_states=ehs)

        def heads(t):
            return t.view(4, t.shape[1], attn.heads, -1).transpose(1, 2)

        q = torch.cat([attn.norm_q(heads(attn.to_q(hs))),
                       attn.norm_added_q(heads(attn.add_q_proj(ehs)))], 2)
        k = torch.cat([attn.norm_k(heads(attn.to_k(hs))),
                       attn.norm_added_k(heads(attn.add_k_proj(ehs)))], 2)
        v = torch.cat([heads(attn.to_v(hs)), heads(attn.add_v_proj(ehs))], 2)
        probs = (q[:, :, :16] @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # image queries
        w = torch.cat([torch.ones(2, 10), factors[:, :10]])  # uncond half untouched
        w = torch.cat([torch.ones(4, 16), w], 1)  # the image keys' columns untouched
        out = (probs * w[:, None, None, :]) @ v
        want = attn.to_out[0](out.transpose(1, 2).reshape(4, 16, -1))
    torch.testing.assert_close(got[0], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], plain[1])  # the text stream's output
    assert torch.equal(got[0][:2], plain[0][:2])  # the unconditional rows
    assert (got[0][2:] - plain[0][2:]).abs().max() > 1e-3 and editor.calls == 1


def test_joint_reweight_one_is_the_untraced_image_and_other_weights_change_it(sd3):
    def latents(**kw):
        return sd3(P, num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0), **kw).images

    plain = latents()
    assert word_positions(sd3, P, "red")[0] == 2 and max(word_positions(sd3, P, "red")) >= 77
    with reweighting(sd3, P, {"red": 1.0, "square": 1.0}) as state:
        same = latents()
    n_blocks = sd3.transformer.config.num_layers
    assert torch.equal(plain, same) and state.calls == 2 * n_blocks
    with reweighting(sd3, P, {"red": 4.0}, steps=(1, None)) as state:
        steered = latents()
    assert state.calls == n_blocks and (steered - plain).abs().max() > 1e-4
    procs = sd3.transformer.attn_processors
    assert not any(isinstance(p, SiteProcessor) for p in procs.values())
    tr, base = steer.reweight(sd3, P, {"red": 1.0}, seed=0, steps=2, baseline=True)
    assert torch.equal(tr.latents, base.latents)
    assert tr.meta["reweight"]["positions"] == word_positions(sd3, P, "red")


def test_token_effects_on_sd3(sd3):
    fx = steer.token_effects(sd3, "a red circle", seed=0, steps=2, words=["red"], record=None)
    ref = sd3("a circle", generator=torch.Generator().manual_seed(0), num_inference_steps=2,
              guidance_scale=7.5, output_type="np").images[0]
    np.testing.assert_allclose(fx.ablated["red"], ref, atol=ATOL, rtol=0)
    assert fx.effects["red"] > 0


def test_pad_ablation_on_sd3_pads_every_encoder(sd3):
    """SD3's word has CLIP tokens and T5 pieces: "pad" gives them all the padding embedding."""
    red = word_positions(sd3, P, "red")
    with Hooks() as hooks:
        pads = steer._pad_hooks(hooks, sd3, P, [[], red], {"max_sequence_length": 256})
        embeds = sd3.encode_prompt([P, P], None, None, do_classifier_free_guidance=False)[0]
    assert len(pads) == 3 and all(p.applied for p in pads)  # CLIP-L, CLIP-G, T5
    assert pads[2].rows == [[], [p - 77 for p in red if p >= 77]]
    plain = sd3.encode_prompt(P, None, None, do_classifier_free_guidance=False)[0]
    torch.testing.assert_close(embeds[:1], plain)
    for part in (slice(0, 77), slice(77, None)):  # both segments changed
        assert (embeds[1, part] - plain[0, part]).abs().max() > 1e-4
    fx = steer.token_effects(sd3, P, seed=0, steps=2, mode="pad", words=["red"], record=None)
    assert fx.effects["red"] > 0
