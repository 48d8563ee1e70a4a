"""Everything downstream of the engine on diffusion-transformer traces: SD3 (joint attention, flow
matching, CLIP + T5) and PixArt-Σ (cross-attention, epsilon). Heatmaps with every pooling, the
plots, the HTML report, the widgets' Python side, sweeps, token effects, compare, save / load and
the CLI. Tiny random-weight pipelines (sdlens.testing), CPU fp32, 2 steps."""

from __future__ import annotations

import functools
import re

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import sdlens
from sdlens import plot
from sdlens.analysis.guidance import PREDICTION_LABELS, prediction_label
from sdlens.analysis.heatmaps import POOLINGS, word_heatmap
from sdlens.analysis.tokens import token_view, trace_words
from sdlens.testing import random_pipeline
from sdlens.views.cli import describe_trace, main
from sdlens.views.report import build_report

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red circle and a blue square"
STEPS = 2
ARCHS = ("sd3", "pixart")
# the DiT test beds' 8x8 latents are no resolution bin; clean_caption needs bs4 / ftfy
CALL = {"sd3": {}, "pixart": {"use_resolution_binning": False, "clean_caption": False},
        "sana": {"use_resolution_binning": False, "clean_caption": False, "height": 32,
                 "width": 32}}
LABEL = {"sd3": "velocity", "pixart": "noise"}


@functools.lru_cache(maxsize=None)
def pipe_of(arch: str):
    return random_pipeline(arch, seed=0)


@functools.lru_cache(maxsize=None)
def traced(arch: str, seed: int = 0, prompt: str = PROMPT, guidance_scale: float = 4.0):
    return sdlens.generate(pipe_of(arch), prompt, seed=seed, steps=STEPS,
                           guidance_scale=guidance_scale, **CALL[arch])


def image_size(tr) -> tuple[int, int]:
    return tr.images[0].size[1], tr.images[0].size[0]


# ----------------------------------------------------------------------------- labels
def test_prediction_label_per_prediction_type():
    assert prediction_label("flow") == "velocity"
    assert prediction_label("epsilon") == "noise"
    assert prediction_label("v_prediction") == "v"
    assert prediction_label("sample") == "x0"
    assert set(PREDICTION_LABELS.values()) == {"velocity", "noise", "v", "x0"}
    assert prediction_label(traced("sd3")) == "velocity"
    assert prediction_label(traced("pixart")) == "noise"


@pytest.mark.parametrize("ptype,label", [("v_prediction", "v"), ("sample", "x0"),
                                         ("epsilon", "noise")])
def test_unet_traces_name_their_prediction(ptype, label):
    from fakes import fake_trace
    from sdlens.trace.ops import replace
    from sdlens.views.widgets import TraceViewer

    base = fake_trace(steps=3)
    tr = replace(base, meta={**base.meta, "family": "sd1", "prediction_type": ptype})
    assert prediction_label(tr) == label
    assert f"{label} (guided)" in _strip_labels(plot.step_strip(tr, n=2, decoder="linear"))
    v = TraceViewer(tr, decoder="linear")
    assert [p["label"] for p in v.panels if p["name"] == "noise"] == [
        f"guided {label} · linear preview"]


def _strip_labels(fig: Figure) -> list[str]:
    return [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]


@pytest.mark.parametrize("arch", ARCHS)
def test_views_name_the_prediction(arch, tmp_path):
    from sdlens.views.widgets import TraceViewer
    from sdlens.views.widgets.frames import panel_notes

    tr = traced(arch)
    label, other = LABEL[arch], ("noise" if LABEL[arch] == "velocity" else "velocity")
    # step strip: the prediction row
    rows = _strip_labels(plot.step_strip(tr, n=2, decoder="linear"))
    assert f"{label} (guided)" in rows and not any(other in r for r in rows)
    # scheduler curves: the title
    assert f"predicts {label}" in plot.scheduler_curves(tr)._suptitle.get_text()
    # the viewer's panel captions
    v = TraceViewer(tr, decoder="linear")
    captions = {p["name"]: p["label"] for p in v.panels}
    assert captions["noise"].startswith(f"guided {label} · ")  # and which preview
    assert not any(other in c for c in captions.values())
    # a trace without the prediction says which panel is missing, by its name
    light = sdlens.generate(pipe_of(arch), PROMPT, seed=0, steps=STEPS, record=["latents"],
                            **CALL[arch])
    assert any(f"no guided-{label} or CFG-delta panel" in n for n in panel_notes(light))
    # the report's settings and the CLI's info
    html = build_report(tr, decoder="linear")
    assert f"the model predicts {label}" in html
    if label == "velocity":  # a flow trace's report never calls its prediction noise
        assert "noise" not in re.sub(r"base64,[A-Za-z0-9+/=]+", "", html).lower()
    path = tr.save(tmp_path / "run.sdlens")
    assert f"the model predicts {label}" in describe_trace(sdlens.load(path))


# ----------------------------------------------------------------------------- heatmaps
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("pooling", POOLINGS)
def test_heatmaps_every_pooling_and_layer_choice(arch, pooling):
    from sdlens.views.widgets.frames import layer_options, layer_selector

    tr = traced(arch)
    size = image_size(tr)
    keys = [k for k, _ in layer_options(tr)]
    assert "all" in keys and len(keys) >= 1 + len(tr.attention.layers)
    for word in ("red", "circle", "square"):
        for key in keys:
            h = word_heatmap(tr, word, layers=layer_selector(key), pooling=pooling)
            assert h.shape == size and torch.isfinite(h).all()
            assert 0 <= float(h.min()) and float(h.max()) <= 1
        per = word_heatmap(tr, word, pooling=pooling, per_step=True)
        assert per.shape == (len(tr.attention.steps), *size)
    assert tr.heatmap("red circle").shape == size  # a phrase


# ----------------------------------------------------------------------------- plots, report
@pytest.mark.parametrize("arch", ARCHS)
def test_plots(arch):
    tr = traced(arch)
    figs = [plot.overlay(tr, "circle"), plot.heatmap_grid(tr), plot.step_strip(tr, decoder="linear"),
            plot.guidance_strip(tr, 0, scales=(1, 4)), plot.guidance_curves(tr),
            plot.scheduler_curves(tr), plot.commitment_curves(tr), plot.token_view(tr)]
    assert all(isinstance(f, Figure) for f in figs)
    # the step strip shows the four rows: x_t, x0, the prediction, the CFG delta
    assert _strip_labels(figs[2])[:4] == ["x_t (latents)", "x0 (predicted)",
                                          f"{LABEL[arch]} (guided)", "|CFG delta|"]


def test_token_plot_names_the_encoders():
    ticks = [t.get_text() for t in plot.token_view(traced("sd3")).axes[0].get_xticklabels()]
    assert any("CLIP" in t for t in ticks) and any("T5" in t for t in ticks)


@pytest.mark.parametrize("arch", ARCHS)
def test_report_builds_every_section(arch):
    html = build_report(traced(arch), decoder="linear")
    assert "Not available" not in html
    for section in ("Image and word heatmaps", "Step by step", "Tokens", "Classifier-free guidance",
                    "Scheduler"):
        assert f"<h2>{section}</h2>" in html


def test_report_says_which_encoder_saw_which_word():
    html = build_report(traced("sd3"), decoder="linear")
    tokens = html.split("<h2>Tokens</h2>")[1].split("<h2>")[0]
    assert "CLIP and T5 saw every word" in tokens
    assert "<th>encoder</th>" in tokens
    assert "<td>CLIP</td><td>2</td><td><code>red&lt;/w&gt;</code>" in tokens
    assert "<td>T5</td><td>78</td><td><code>▁r</code>" in tokens
    # CLIP's padding has no maps and is left out of the table
    assert tokens.count("&lt;|endoftext|&gt;") == 1


# ----------------------------------------------------------------------------- widgets
@pytest.mark.parametrize("arch", ARCHS)
def test_trace_viewer_state(arch):
    from sdlens.views.widgets import TraceViewer

    tr = traced(arch)
    v = TraceViewer(tr, decoder="linear")
    assert [p["name"] for p in v.panels] == ["x_t", "x0", "noise", "cfg_delta"]
    assert all(len(v.frames[p]) == STEPS for p in v.frames)
    words = [w.name for w in trace_words(tr, punctuation=False)]
    assert [w["key"] for w in v.words] == words and set(v.heat) == set(words)
    assert all(len(v.heat[w]["steps"]) == len(tr.attention.steps) for w in words)
    v.select_word("circle")
    assert v.word == "circle"
    v.layers = tr.attention.layers[1]  # one block's maps
    assert dict(v.layer_options)[tr.attention.layers[1]] == "block.1 (4x4)"
    assert set(v.heat) == set(words)
    v.step = 0
    assert v.notes == []
    if arch == "sd3":  # the chips say which encoders saw the word
        assert all(w["encoders"] == ["CLIP", "T5"] for w in v.words)
    else:
        assert all(w["encoders"] == [] for w in v.words)


def test_token_view_groups_tokens_by_encoder():
    from sdlens.views.widgets import TokenView

    tv = TokenView(traced("sd3"))
    encoders = [r["encoder"] for r in tv.rows]
    assert encoders == ["CLIP"] * 9 + ["T5"] * 19  # start, 7 words, end; 18 pieces and </s>
    assert "CLIP 7 of 75 · T5 18 of 255" in tv.title
    assert "CLIP and T5 saw every word" in tv.footer and "padding left out (68 positions)" in tv.footer
    red = next(r for r in tv.rows if r["token"] == "▁r")
    assert tv.hover_text(red["position"]).endswith("word 'red' · seen by T5")
    assert all(r["encoder"] == "" for r in TokenView(traced("pixart")).rows)


def test_token_view_words_past_clip_are_t5_words():
    from sdlens.views.widgets import TokenView

    long = " ".join(["red circle"] * 40) + " beyond"  # ~81 CLIP tokens: "beyond" is past 77
    tr = sdlens.generate(pipe_of("sd3"), long, seed=0, steps=1)
    view = token_view(tr)
    beyond = next(w for w in view.words if w.text == "beyond")
    assert beyond.encoders == ("t5",)
    tv = TokenView(tr)
    # CLIP keeps 75 prompt tokens: "red circle" 37 times and "red"; the rest only T5 saw
    assert ("CLIP and T5 saw the other words; T5 alone: circle#38 red#39 circle#39 red#40 "
            "circle#40 beyond") in tv.footer
    assert tr.heatmap("beyond").shape == image_size(tr)


@pytest.mark.parametrize("arch", ARCHS)
def test_studio_runs_and_streams(arch):
    from sdlens.views.widgets import Studio

    pipe = pipe_of(arch)
    call = {k: v for k, v in CALL[arch].items()}
    st = Studio(pipe, steps=STEPS, guidance_scale=4.0, pipe_kwargs=call,
                viewer={"decoder": "linear"})
    if arch == "sd3":  # a flow model keeps its scheduler: the UNet schedulers are not offered
        assert [v for _, v in st.scheduler.options] == ["default"]
    st.generate(wait=True, timeout=120)
    assert st.error is None, st.error
    assert len(st.streamed) == STEPS and len(st.runs) == 1
    ref = traced(arch)
    tr = st.traces[-1]
    assert torch.equal(tr.latents, ref.latents)  # the same run as generate()'s
    assert [p["label"] for p in st.viewer.panels][2].startswith(f"guided {LABEL[arch]} · ")
    st.seed.value = 1
    st.generate(wait=True, timeout=120)
    assert st.ab is not None and st.ab_diff() == {"seed": (0, 1)}


# ----------------------------------------------------------------------------- sweeps, effects
def single(arch, seed, g):
    """The reference: one plain diffusers call."""
    return pipe_of(arch)(PROMPT, generator=torch.Generator().manual_seed(seed), guidance_scale=g,
                         num_inference_steps=STEPS, output_type="np", **CALL[arch]).images[0]


@pytest.mark.parametrize("arch", ("sd3", "pixart", "sana"))
def test_cfg_by_seed_sweep_equals_single_runs(arch):
    from sdlens.views.widgets import GridViewer

    pipe = pipe_of(arch)
    grid = sdlens.sweep(pipe, PROMPT, seeds=[0, 1], guidance_scales=[1.0, 4.0], steps=STEPS,
                        progress=False, **CALL[arch])
    assert list(grid.axes) == ["guidance", "seed"]
    for j, g in enumerate((1.0, 4.0)):
        for k, seed in enumerate((0, 1)):
            np.testing.assert_allclose(grid.arrays[j, k], single(arch, seed, g), atol=1e-4, rtol=0)
            tr = grid.traces[j, k]
            assert tr.guidance_scale == g and tr.do_cfg == (g > 1)
            assert prediction_label(tr) == ("noise" if arch == "pixart" else "velocity")
    gv = GridViewer(grid)
    assert gv.panel.col_labels == ["seed 0", "seed 1"]
    assert [r.split("\n")[0] for r in gv.panel.row_labels] == ["CFG 1", "CFG 4"]


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_guidance_in_one_call_equals_single_runs(arch):
    """Two CFG scales share one call (the per-sample guidance hook, through the adapter's CFG
    halves and output tensor: PixArt guides its noise and variance channels together)."""
    grid = sdlens.sweep(pipe_of(arch), PROMPT, seeds=[0], guidance_scales=[2.0, 4.0],
                        steps=STEPS, progress=False, record=None, **CALL[arch])
    assert grid.meta["batches"] == 1
    for j, g in enumerate((2.0, 4.0)):
        np.testing.assert_allclose(grid.arrays[j], single(arch, 0, g), atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_token_effects_and_compare(arch):
    eff = sdlens.token_effects(pipe_of(arch), PROMPT, words=["red", "square"], steps=STEPS,
                               guidance_scale=4.0, **CALL[arch])
    assert eff.words == ["red", "square"]
    assert all(np.isfinite(eff.effects[w]) and eff.effects[w] > 0 for w in eff.words)
    cmp = sdlens.compare(traced(arch), traced(arch, seed=1))
    assert cmp.differs == {"seed": (0, 1)}
    assert not sdlens.compare(traced(arch), traced(arch)).differs


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_keeps_what_the_views_read(arch, tmp_path):
    from sdlens.views.widgets import TokenView, TraceViewer

    tr = traced(arch)
    back = sdlens.load(tr.save(tmp_path / "run.sdlens"))
    assert back.prediction_type == tr.prediction_type
    assert back.text_segments == tr.text_segments
    torch.testing.assert_close(back.heatmap("circle"), tr.heatmap("circle"), rtol=0, atol=1e-3)
    assert TokenView(back).rows == TokenView(tr).rows
    # no VAE at hand and no linear table for these models: the latents' first channels, said so
    v = TraceViewer(back)
    assert v.decoder == "channels" and [d for d, _ in v.decoder_options] == ["channels"]
    assert [p["label"] for p in v.panels][:3] == [
        "x_t (latents) · first 3 latent channels", "x0 prediction · first 3 latent channels",
        f"guided {LABEL[arch]} · first 3 latent channels"]  # said so, not silently
    assert all(len(v.frames[p]) == STEPS for p in v.frames)
    html = build_report(back)
    assert "Not available" not in html and "first 3 latent channels" in html
    # A / B of two saved runs
    from sdlens.views.widgets import ABView

    other = sdlens.load(traced(arch, seed=1).save(tmp_path / "run1.sdlens"))
    ab = ABView(back, other)
    assert ab.differs == {"seed": (0, 1)} and len(ab.panel.x0_diff) == STEPS


# ----------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd3") / "model"
    pipe_of("sd3").save_pretrained(folder)
    return folder


def test_cli_trace_info_report_sweep_on_sd3(sd3_folder, tmp_path, capsys):
    run = tmp_path / "run.sdlens"
    assert main(["trace", PROMPT, "--model", str(sd3_folder), "--steps", "2", "--cfg", "4",
                 "--out", str(run), "-q"]) == 0
    tr = sdlens.load(run)
    assert tr.meta["family"] == "sd3" and tr.prediction_type == "flow"
    torch.testing.assert_close(tr.latents, traced("sd3").latents)  # the folder is the same model
    capsys.readouterr()
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "the model predicts velocity (flow)" in out
    assert "(CLIP 7 of 75, T5 18 of 255 tokens)" in out and "CLIP and T5 saw every word" in out
    assert re.search(r"block\.0\s+4x4\s+transformer_blocks\.0\.attn", out)
    assert main(["report", str(run), "--out", str(tmp_path / "r.html"), "--pooling", "daam",
                 "-q"]) == 0
    assert "the model predicts velocity" in (tmp_path / "r.html").read_text()
    assert main(["sweep", PROMPT, "--model", str(sd3_folder), "--steps", "2", "--cfg", "1,4",
                 "--seeds", "0,1", "--out", str(tmp_path / "grid.png"), "--quiet"]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_cli_demo_on_sd3(sd3_folder, tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(sd3_folder), "--steps", "2", "--grid-cfg", "1,4",
                 "--grid-seeds", "0", "--out", str(out), "-q"]) == 0
    names = {"image.png", "run.sdlens", "heatmaps.png", "steps.png", "report.html", "grid.png"}
    assert {p.name for p in out.iterdir()} == names
    html = (out / "report.html").read_text()
    text = re.sub(r"base64,[A-Za-z0-9+/=]+", "", html)  # the words, not the images' bytes
    assert "the model predicts velocity" in text and "noise" not in text.lower()


def test_cli_on_pixart(tmp_path, capsys):
    # a test bed at 32x32 latents: a size PixArt's resolution binning knows (256 px), so the
    # commands run the pipeline with its defaults
    folder = tmp_path / "model"
    random_pipeline("pixart", seed=0, sample_size=32).save_pretrained(folder)
    run = tmp_path / "run.sdlens"
    assert main(["trace", PROMPT, "--model", str(folder), "--steps", "2", "--cfg", "4",
                 "--out", str(run), "-q"]) == 0
    capsys.readouterr()
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "the model predicts noise (epsilon)" in out and "(18 of 299 tokens)" in out
    assert re.search(r"block\.1\s+16x16\s+transformer_blocks\.1\.attn2", out)
    assert main(["report", str(run), "--out", str(tmp_path / "r.html"), "-q"]) == 0
    assert "<h2>Tokens</h2>" in (tmp_path / "r.html").read_text()
    assert main(["sweep", PROMPT, "--model", str(folder), "--steps", "2", "--cfg", "1,4",
                 "--seeds", "0,1", "--out", str(tmp_path / "grid.png"), "--quiet"]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 0


# ----------------------------------------------------------------------------- pad ablation
def _pad_at(module, pad_id: int, positions: list[int]):
    """A forward hook (the test's own oracle) that gives ``positions`` the pad token's
    embedding in every row."""
    def hook(mod, args, out):
        out = out.clone()
        out[:, positions] = mod.weight[pad_id]
        return out
    return module.register_forward_hook(hook)


@pytest.mark.parametrize("arch", ARCHS)
def test_pad_ablation_pads_the_word_in_every_encoder(arch):
    """mode="pad" equals a plain call whose prompt embeddings were made with the word's tokens
    given the pad embedding in each text encoder: SD3's CLIP-L and CLIP-G at its CLIP position,
    T5 at its pieces' positions in T5's own sequence; PixArt's T5 at its pieces."""
    pipe = pipe_of(arch)
    eff = sdlens.token_effects(pipe, PROMPT, mode="pad", words=["red"], steps=STEPS,
                               guidance_scale=4.0, record=None, **CALL[arch])
    gen = torch.Generator().manual_seed(0)
    torch.set_grad_enabled(False)  # encode_prompt runs outside the pipeline's no_grad
    try:
        ref = _padded_reference(pipe, arch, gen)
    finally:
        torch.set_grad_enabled(True)
    np.testing.assert_allclose(eff.ablated["red"], ref, atol=1e-4, rtol=0)
    assert eff.effects["red"] > 0


def _padded_reference(pipe, arch: str, gen) -> np.ndarray:
    """The plain call with the oracle's padded prompt embeddings (the negative prompt "")."""
    if arch == "sd3":
        targets = [(pipe.text_encoder.get_input_embeddings(), pipe.tokenizer.pad_token_id, [2]),
                   (pipe.text_encoder_2.get_input_embeddings(), pipe.tokenizer_2.pad_token_id, [2]),
                   (pipe.text_encoder_3.encoder.embed_tokens, pipe.tokenizer_3.pad_token_id, [1, 2])]
        handles = [_pad_at(*t) for t in targets]
        try:
            pe, _, ppe, _ = pipe.encode_prompt(PROMPT, PROMPT, PROMPT,
                                               do_classifier_free_guidance=False)
        finally:
            for h in handles:
                h.remove()
        ne, _, npe, _ = pipe.encode_prompt("", "", "", do_classifier_free_guidance=False)
        return pipe(prompt_embeds=pe, pooled_prompt_embeds=ppe, negative_prompt_embeds=ne,
                    negative_pooled_prompt_embeds=npe, generator=gen, guidance_scale=4.0,
                    num_inference_steps=STEPS, output_type="np").images[0]
    # PixArt: "red" is T5's "▁r", "ed" at positions 1, 2 (no start token)
    handle = _pad_at(pipe.text_encoder.encoder.embed_tokens, pipe.tokenizer.pad_token_id, [1, 2])
    try:
        pe, mask, _, _ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False,
                                            clean_caption=False)
    finally:
        handle.remove()
    ne, nmask, _, _ = pipe.encode_prompt("", do_classifier_free_guidance=False, clean_caption=False)
    return pipe(prompt=None, negative_prompt=None, prompt_embeds=pe, prompt_attention_mask=mask,
                negative_prompt_embeds=ne, negative_prompt_attention_mask=nmask, generator=gen,
                guidance_scale=4.0, num_inference_steps=STEPS, output_type="np",
                **CALL[arch]).images[0]


def test_pad_ablation_under_sanas_instruction_is_a_clear_error():
    with pytest.raises(ValueError, match="complex_human_instruction"):
        sdlens.token_effects(pipe_of("sana"), PROMPT, mode="pad", words=["red"], steps=STEPS,
                             **CALL["sana"])


# ----------------------------------------------------------------------------- the token view's JS
@pytest.mark.browser
def test_token_view_js_heads_each_encoders_tokens():
    """token_view.js rendered in Chromium with the widget's own state (a stand-in model object,
    no notebook): a heading per encoder before its first token, the encoder in each hover text."""
    import json

    pytest.importorskip("playwright.sync_api")
    from pathlib import Path

    from browser import browser, find_chromium
    from sdlens.views.widgets import TokenView, token_view as token_view_module

    if find_chromium() is None:
        pytest.skip("no Chromium binary")
    tv = TokenView(traced("sd3"))
    state = {"rows": tv.rows, "title": tv.title, "footer": tv.footer, "hovered": -1}
    js = Path(token_view_module.__file__).parent / "static" / "token_view.js"
    module = js.read_text().replace("export default { render };", "")
    page_js = module + f"""
const state = {json.dumps(state)};
const model = {{ get: (k) => state[k], set: (k, v) => {{ state[k] = v; }}, save_changes() {{}},
                 on() {{}}, off() {{}} }};
render({{ model, el: document.getElementById("root") }});
document.body.dataset.done = "1";
"""
    with browser() as b:
        page = b.new_page()
        page.set_content(f'<div id="root"></div><script type="module">{page_js}</script>')
        page.wait_for_selector("body[data-done='1']", timeout=10_000)
        heads = page.locator(".sdl-token-encoder").all_text_contents()
        assert heads == ["CLIP:", "T5:"]
        red_t5 = page.locator(".sdl-token[data-position='78']")
        assert "seen by T5" in red_t5.get_attribute("title")
        # CLIP's tokens come before its heading's successor, T5's after
        order = page.evaluate("() => [...document.querySelectorAll('.sdl-token-row > span')]"
                              ".map(e => e.className.includes('encoder') ? e.textContent : "
                              "e.dataset.position)")
        assert order[0] == "CLIP:" and order[order.index("T5:") + 1] == "77"
