"""Tokens, guidance, scheduler view, previews and compare: known input -> known output."""

from __future__ import annotations

from importlib import import_module

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fakes import fake_trace, tokenizer
from sdlens.analysis.compare import compare as _compare
from sdlens.trace import replace
G = import_module("sdlens.analysis.guidance")
P = import_module("sdlens.analysis.previews")
T = import_module("sdlens.analysis.tokens")


# --------------------------------------------------------------------------- tokens
def test_words_from_tokens_groups_subwords_and_decodes_bytes():
    toks = ["<|startoftext|>", "dream", "beach</w>", ",</w>", "cafÃ©</w>", "<|endoftext|>"]
    words = T.words_from_tokens(toks)
    assert [w.text for w in words] == ["dreambeach", ",", "café"]
    assert words[0].positions == (1, 2) and words[1].is_punctuation
    assert words[2].positions == (4,)


def test_tokenize_reports_the_75_token_limit():
    tok = tokenizer()
    long = " ".join(f"w{i}" for i in range(20)) + " " + " ".join(["cat"] * 60) + " zebra giraffe"
    view = T.tokenize(long, tok)
    assert view.n_prompt_tokens == 75 and view.limit == 75
    assert view.truncated and view.truncated_words[-2:] == ["zebra", "giraffe"]
    assert view.rows[0].token == "<|startoftext|>" and view.rows[-1].token == "<|endoftext|>"
    assert len(view.rows) == 77
    short = T.tokenize("a photograph of an astronaut riding a horse", tok)
    assert [r.id for r in short.rows] == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert not short.truncated and short.n_prompt_tokens == 8
    with pytest.raises(TypeError):
        T.tokenize("x", object())


def test_token_view_attention_shares_match_the_maps():
    tr = fake_trace()
    view = T.token_view(tr)
    assert [r.word for r in view.rows] == ["", "a", "red", "circle", "and", "a", "blue", "square", ""]
    # shares: mean over steps, layers, pixels of the recorded probabilities
    ref = np.mean([tr.attention[l][:, 0].float().mean(dim=(0, 2, 3)).numpy()
                   for l in tr.attention.layers], axis=0)
    got = np.array([r.attention for r in view.rows[:-1]])  # end token not recorded in the fake
    assert np.allclose(got, ref, atol=1e-6)
    assert view.rows[-1].attention is None
    # shares of the kept positions are part of a softmax over all 77 positions
    assert 0 < got.sum() < 1
    # the object words receive more than the filler words
    share = {r.word: r.attention for r in view.rows if r.word}
    assert share["circle"] > 2 * share["and"]
    d = view.to_dict()
    assert d["n_prompt_tokens"] == 7 and d["tokens"][3]["token"] == "circle</w>"
    assert "circle</w>" in str(view)


def test_nearest_tokens_by_cosine():
    from sdlens.models.shapes.architecture import text_encoder

    tok = tokenizer()
    enc = text_encoder()
    emb = enc.get_input_embeddings().weight
    man, guy, gent = (tok.convert_tokens_to_ids(t) for t in ("man</w>", "guy</w>", "gentleman</w>"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        s = float(emb.std())
        emb[guy] = emb[man] + 0.05 * s * torch.randn(emb.shape[1], generator=g)
        emb[gent] = emb[man] + 0.3 * s * torch.randn(emb.shape[1], generator=g)
    pipe = SimpleNamespace(text_encoder=enc, tokenizer=tok)
    out = T.nearest_tokens(pipe, "man", k=3)
    assert [o[0] for o in out[:2]] == ["guy", "gentleman"]
    assert out[0][2] > out[1][2] > out[2][2] and out[0][2] > 0.99
    assert man not in [o[1] for o in out]  # the word itself is left out
    with pytest.raises(TypeError, match="tokenizer"):
        T.nearest_tokens(enc, "man")
    with pytest.raises(ValueError):
        T.nearest_tokens(pipe, "man", k=0)


# --------------------------------------------------------------------------- guidance
@pytest.mark.parametrize("scheduler,form", [("ddim", "alpha"), ("euler", "sigma")])
def test_counterfactual_at_recorded_scale_is_the_recorded_x0(scheduler, form):
    tr = fake_trace(scheduler=scheduler, cfg=7.5)
    assert G.schedule_form(tr) == form
    for step in range(len(tr.timesteps)):
        x0 = G.x0_at_guidance(tr, step, 7.5)
        assert torch.allclose(x0, tr.x0[step], rtol=1e-4, atol=1e-4)
    # x0 is affine in the scale: the difference is (s2 - s1) * B * delta
    a, b = G.x0_coefficients(tr, 3)
    d = G.x0_at_guidance(tr, 3, 9.0, batch=0) - G.x0_at_guidance(tr, 3, 1.0, batch=0)
    assert torch.allclose(d, 8.0 * b * G.cfg_delta(tr, 3, batch=0), atol=1e-4)
    # at scale 1 the text prediction alone
    x1 = G.x0_at_guidance(tr, 3, 1.0)
    assert torch.allclose(x1, a * tr.latents[3] + b * tr.noise_text[3], atol=1e-4)


def test_x0_coefficients_known_values():
    tr = fake_trace(scheduler="ddim")
    sched = __import__("diffusers").DDIMScheduler.from_config(tr.meta["scheduler_config"])
    ac = float(sched.alphas_cumprod[int(tr.timesteps[0])])
    a, b = G.x0_coefficients(tr, 0)
    assert a == pytest.approx(1 / math.sqrt(ac)) and b == pytest.approx(-math.sqrt(1 - ac) / math.sqrt(ac))
    tr = replace(tr, meta={**tr.meta, "prediction_type": "v_prediction"})
    a, b = G.x0_coefficients(tr, 0)
    assert a == pytest.approx(math.sqrt(ac)) and b == pytest.approx(-math.sqrt(1 - ac))
    te = fake_trace(scheduler="euler")
    s = float(te.sigmas[2])
    assert G.x0_coefficients(te, 2) == pytest.approx((1.0, -s))


def test_cfg_delta_and_stats():
    tr = fake_trace()
    d = G.cfg_delta(tr)
    assert d.shape == tr.noise.shape
    assert torch.allclose(d, tr.noise_text - tr.noise_uncond)
    st = G.guidance_stats(tr)
    rms = (tr.noise_text[:, 0] - tr.noise_uncond[:, 0]).flatten(1).pow(2).mean(1).sqrt().numpy()
    assert np.allclose(st.delta_rms, rms, atol=1e-6)
    assert np.allclose(st.push_rms, 7.5 * rms, atol=1e-5)
    assert ((st.cosine > 0.9) & (st.cosine <= 1)).all()  # the fake's text = uncond + 0.3 noise
    tr = replace(tr, noise_uncond=None)
    with pytest.raises(ValueError, match="no unconditional"):
        G.cfg_delta(tr)
    with pytest.raises(ValueError, match="no unconditional"):
        G.x0_at_guidance(tr, 0, 3.0)


def test_guidance_bad_arguments():
    tr = fake_trace()
    with pytest.raises(ValueError, match="out of range"):
        G.x0_at_guidance(tr, 10, 3.0)
    with pytest.raises(TypeError, match="scale must be a number"):
        G.x0_at_guidance(tr, 0, "7")
    with pytest.raises(ValueError, match="batch"):
        G.x0_at_guidance(tr, 0, 3.0, batch=2)


def test_scheduler_view():
    tr = fake_trace(scheduler="ddim", steps=10)
    v = G.scheduler_view(tr)
    assert v.scheduler == "DDIMScheduler" and v.form == "alpha"
    assert np.allclose(v.dt[:-1], 100) and v.dt[-1] == v.timesteps[-1]
    assert v.dt.sum() == pytest.approx(v.timesteps[0])
    assert np.allclose(v.sigmas, np.sqrt((1 - v.alpha_bar) / v.alpha_bar))
    assert np.allclose(v.log_snr, -2 * np.log(v.sigmas))
    assert (np.diff(v.alpha_bar) > 0).all()  # less noise at every step
    te = fake_trace(scheduler="euler")
    ve = G.scheduler_view(te)
    assert np.allclose(ve.sigmas, te.sigmas.numpy()) and ve.form == "sigma"
    assert set(v.to_dict()) >= {"timesteps", "sigmas", "dt", "dsigma"}


# --------------------------------------------------------------------------- previews
def test_latent_to_rgb_applies_the_matrix():
    lat = torch.zeros(4, 2, 2)
    lat[1] = 1.0  # channel 1 only -> row 1 of the matrix
    rgb = P.latent_to_rgb(lat, P.SD1_MATRIX)
    assert torch.allclose(rgb[:, 0, 0], torch.tensor(P.SD1_MATRIX[1]))
    rgb = P.latent_to_rgb(torch.zeros(2, 4, 3, 3), P.SDXL_MATRIX, P.SDXL_BIAS)
    assert rgb.shape == (2, 3, 3, 3)
    assert torch.allclose(rgb[0, :, 1, 1], torch.tensor(P.SDXL_BIAS))
    with pytest.raises(ValueError, match="input channels"):
        P.latent_to_rgb(torch.zeros(3, 2, 2), P.SD1_MATRIX)


class LinearVAE(torch.nn.Module):
    """A 'VAE' whose latent is a known affine map of the 4x4-pooled image, and whose decoder
    inverts it: a linear decoder must recover the inverse exactly."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.P = torch.nn.Parameter(torch.randn(3, 4, generator=g), requires_grad=False)
        self.q = torch.nn.Parameter(torch.randn(4, generator=g), requires_grad=False)
        self.config = SimpleNamespace(scaling_factor=0.5, shift_factor=None)
        self.decodes = 0

    def encode(self, x):
        pooled = F.avg_pool2d(x, 4)  # (n, 3, h, w)
        lat = torch.einsum("nchw,cd->ndhw", pooled, self.P) + self.q[:, None, None]
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=lat))

    def decode(self, z):
        self.decodes += 1
        pinv = torch.linalg.pinv(self.P)  # (4, 3)
        rgb = torch.einsum("ndhw,dc->nchw", z - self.q[:, None, None], pinv)
        return SimpleNamespace(sample=F.interpolate(rgb, scale_factor=4, mode="nearest"))


def test_fit_linear_decoder_recovers_a_linear_vae():
    vae = LinearVAE()
    c = P.fit_linear_decoder(vae, n=16, seed=3)
    assert c["rmse"] < 1e-5 and c["n_images"] == 16 and c["scaling_factor"] == 0.5
    # the fitted map inverts the encoder on new images (M itself is not unique: 4 latent
    # channels hold 3 colours)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    lat = vae.encode(x).latent_dist.mean * 0.5
    rgb = P.latent_to_rgb(lat, c["matrix"], c["bias"])
    assert torch.allclose(rgb, F.avg_pool2d(x, 4), atol=1e-4)
    assert c == P.fit_linear_decoder(vae, n=16, seed=3)  # reproducible, to the digit
    path = P.save_linear_decoder(c, __import__("tempfile").mkdtemp() + "/c.json")
    assert P.load_linear_decoder(path)["matrix"] == c["matrix"]
    with pytest.raises(TypeError):
        P.fit_linear_decoder(object())


def test_fit_linear_decoder_reads_a_deterministic_encoder():
    """Sana's DC-AE encodes to a latent, not a posterior: the fit reads it (the TraceViewer of a
    Sana trace fits its linear preview this way)."""
    from sdlens.testing import random_pipeline

    vae = random_pipeline("sana", seed=0).vae
    c = P.fit_linear_decoder(vae, n=4, seed=0)
    assert c["n_images"] == 4 and len(c["matrix"]) == vae.config.latent_channels
    assert np.isfinite(np.asarray(c["matrix"])).all()


@pytest.mark.parametrize("arch", ["qwen-image", "sana"])
def test_vae_preview_of_the_final_latents_is_the_pipelines_image(arch):
    """The VAE decode of a trace's final latents is the pipeline's own image: Qwen-Image's
    video-style VAE (one frame, latents_mean / latents_std) and Sana's DC-AE too."""
    import sdlens
    from sdlens.testing import random_pipeline

    kw = dict(use_resolution_binning=False, clean_caption=False) if arch == "sana" else {}
    tr = sdlens.generate(random_pipeline(arch, seed=0), "a red circle", seed=0, steps=2,
                         height=64, width=64, **kw)
    im = P.previews(tr, "latents", [len(tr.timesteps)], 0, "vae")[0]
    diff = np.abs(np.asarray(im, dtype=int) - np.asarray(tr.images[0].convert("RGB"), dtype=int))
    assert diff.max() <= 1


def _sd1(tr):
    """``tr`` as an SD 1.x trace: the SD 1.x linear decoder for previews."""
    return replace(tr, meta={**tr.meta, "family": "sd1"})


def test_previews_linear_vae_and_cache():
    tr = _sd1(fake_trace())
    ims = P.previews(tr, "x0", [0, 5, 9])
    assert len(ims) == 3 and ims[0].size == (64, 64) and ims[0].mode == "RGB"
    small = P.preview(tr, "latents", step=10, size="latent")
    assert small.size == (16, 16)
    # the linear preview is the SD1 matrix applied to the latent
    arr = np.asarray(small).astype(float) / 127.5 - 1
    ref = P.latent_to_rgb(tr.latents[10, 0], P.SD1_MATRIX).clamp(-1, 1).permute(1, 2, 0).numpy()
    assert np.abs(arr - ref).max() < 1 / 127.5 + 1e-6

    vae = LinearVAE()
    a = P.previews(tr, "x0", [1, 2, 3], decoder="vae", vae=vae, size="latent")
    assert vae.decodes == 1  # one batch
    b = P.previews(tr, "x0", [2, 3], decoder="vae", vae=vae, size="latent")
    assert vae.decodes == 1  # cached
    assert np.array_equal(np.asarray(a[1]), np.asarray(b[0]))
    assert a[0].size == (64, 64)  # the VAE's own resolution
    P.clear_cache(tr)
    P.previews(tr, "x0", [2], decoder="vae", vae=vae)
    assert vae.decodes == 2


def test_preview_errors():
    tr = _sd1(fake_trace())
    with pytest.raises(ValueError, match="out of range"):
        P.preview(tr, "x0", step=10)  # x0 has 10 entries, latents 11
    assert P.preview(tr, "latents", step=10).size == (64, 64)
    with pytest.raises(ValueError, match="kind must be"):
        P.preview(tr, "noise")
    with pytest.raises(ValueError, match="decoder must be"):
        P.preview(tr, decoder="taesd")
    with pytest.raises(ValueError, match="needs a VAE"):
        P.preview(tr, decoder="vae")
    with pytest.raises(TypeError, match="AutoencoderTiny"):
        P.preview(tr, decoder="tiny", vae=LinearVAE())
    tr = replace(tr, meta={**tr.meta, "family": "kandinsky"})
    with pytest.raises(ValueError, match="no linear latent->RGB decoder"):
        P.preview(tr, decoder="linear")
    # "auto" without a linear table or a VAE: the first 3 latent channels, each frame scaled
    assert P.resolve_decoder(tr) == "channels"
    img = np.asarray(P.preview(tr, "x0", step=3, size="latent")).astype(np.float32)
    x = tr.x0[3, 0, :3].float()
    ref = ((x / x.abs().max()).permute(1, 2, 0).numpy() + 1) * 127.5
    np.testing.assert_allclose(img, ref, atol=1.0)


def test_autoencoder_tiny_decoding():
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8, 8, 8),
                           decoder_block_out_channels=(8, 8, 8, 8), num_encoder_blocks=(1, 1, 1, 1),
                           num_decoder_blocks=(1, 1, 1, 1)).eval()
    tr = fake_trace()
    ims = P.previews(tr, "x0", [0, 9], decoder="tiny", vae=tiny)
    assert len(ims) == 2 and ims[0].size == (64, 64)
    direct = P.decode_vae(tiny, tr.x0[9, :1])
    # a batch of 2 and a batch of 1 may round differently in the convolutions: allow one level
    diff = np.abs(np.asarray(ims[1]).astype(int) - np.asarray(P.to_image(direct[0], (64, 64))).astype(int))
    assert diff.max() <= 1


# --------------------------------------------------------------------------- compare
def test_compare_with_itself_is_zero():
    tr = fake_trace()
    c = _compare(tr, tr)
    assert np.all(c.latent_rms == 0) and np.all(c.x0_rms == 0) and np.all(c.x0_relative == 0)
    assert c.parting_step is None
    assert c.words == ["a", "red", "circle", "and", "blue", "square"]
    assert all(np.all(v == 0) for v in c.word_change.values())
    assert "never" in c.summary()


def test_compare_word_change_shows_where_maps_differ():
    a = fake_trace(commit_step=4)
    b = fake_trace(commit_step=7)  # same noise (same seed), circle words settle later
    c = _compare(a, b)
    assert np.all(c.x0_rms == 0)
    for w in ("circle", "red"):
        ch = c.word_change[w]
        assert np.all(ch[[0, 1, 2, 3, 7, 8, 9]] < 1e-6) and np.all(ch[4:7] > 0.1)
    # the square's own region never changes; only the 4x4 layer's cells shared with the moving
    # circle change a little
    assert np.all(c.word_change["square"] < 0.02)


def test_compare_seeds_part_ways():
    a, b = fake_trace(seed=0), fake_trace(seed=1)
    c = _compare(a, b, maps=False)
    assert c.parting_step is not None and 0 <= c.parting_step < 10
    assert (c.x0_rms > 0).all() and c.word_change == {}
    # once parted, each run's x0 is nearer its own final x0 than the other's
    assert (c.own_vs_cross[c.parting_step:] < 0).all()


def test_compare_guidance_scales_part_at_a_known_step():
    """Same seed, noise identical until step 5, then the runs' predictions differ: they part
    at step 5 or later, never before."""
    a, b = fake_trace(), fake_trace()
    x0 = b.x0.clone()
    x0[5:] += 3.0 * torch.randn_like(x0[5:])
    b = replace(b, x0=x0)
    c = _compare(a, b, maps=False)
    assert np.all(c.x0_rms[:5] == 0) and np.all(c.x0_rms[5:] > 0)
    assert c.parting_step is not None and c.parting_step >= 5


def test_compare_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        _compare(fake_trace(steps=10), fake_trace(steps=8))
    with pytest.raises(TypeError, match="not a Trace"):
        _compare(fake_trace(), object())
    with pytest.raises(ValueError, match="batch_b"):
        _compare(fake_trace(), fake_trace(), batch_b=4)


# --------------------------------------------------------------------------- real traces
@pytest.fixture(scope="module")
def real_shapes():
    from sdlens.engine.session import generate
    from sdlens.testing import random_pipeline

    pipe = random_pipeline("shapes")
    a = generate(pipe, "a red circle and a blue square", seed=0, steps=6, guidance_scale=5.0)
    b = generate(pipe, "a red circle and a blue square", seed=0, steps=6, guidance_scale=9.0)
    return pipe, a, b


def test_real_counterfactual_and_compare(real_shapes):
    pipe, a, b = real_shapes
    for step in range(len(a.timesteps)):
        assert torch.allclose(G.x0_at_guidance(a, step, 5.0), a.x0[step], rtol=1e-4, atol=1e-4)
    # the first step of run b is run a's first step at scale 9: same x_T, same predictions
    assert torch.allclose(G.x0_at_guidance(a, 0, 9.0), b.x0[0], rtol=1e-3, atol=1e-3)
    c = _compare(a, b)
    assert c.latent_rms[0] == 0 and c.x0_rms[0] > 0
    same = _compare(a, a)
    assert same.parting_step is None and np.all(same.x0_rms == 0)
    # VAE preview through the live pipeline, batched and cached
    ims = P.previews(a, "x0", [0, 5], decoder="vae")
    assert ims[0].size == (64, 64)
    view = T.token_view(a)
    shares = [r.attention for r in view.rows]
    assert all(s is not None and s > 0 for s in shares) and sum(shares) <= 1 + 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_real_counterfactual_every_architecture(arch):
    """PNDM (sd15), DDIM v-prediction (sd21), Euler (sdxl): the recorded scale reproduces x0."""
    from sdlens.engine.session import generate
    from sdlens.testing import random_pipeline

    tr = generate(random_pipeline(arch), "a red circle", seed=0, steps=4, guidance_scale=6.0)
    for step in range(len(tr.timesteps)):
        x0 = G.x0_at_guidance(tr, step, 6.0)
        scale = float(tr.x0[step].abs().max())
        assert float((x0 - tr.x0[step]).abs().max()) <= 1e-4 * max(scale, 1.0)
    v = G.scheduler_view(tr)
    assert np.isfinite(v.sigmas).all() and len(v.timesteps) == len(tr.timesteps)
