"""The sdlens command end to end (a random-weight shapes model stands in for the shipped one
where the shipped weights are not there yet), the HTML report in headless Chromium, and the
shipped model's heatmaps against its objects' pixels."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fakes import random_shapes_folder, shipped_model_available
from sdlens.analysis.tokens import token_view
from sdlens.views.cli import main

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.fixture(scope="module")
def model():
    return str(random_shapes_folder())


@pytest.fixture(scope="module")
def run_file(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run.sdlens"
    rc = main(["trace", "a red circle and a blue square", "--model", model, "--steps", "3",
               "--cfg", "4", "--seed", "7", "--out", str(out), "-q"])
    assert rc == 0
    return out


def test_trace_writes_a_loadable_trace(run_file):
    from sdlens.trace import load

    tr = load(run_file)
    assert tr.prompts == ["a red circle and a blue square"]
    assert len(tr.timesteps) == 3 and tr.guidance_scale == 4.0 and tr.meta["seeds"] == [7]
    assert tr.latents.shape == (4, 1, 4, 16, 16) and tr.attention is not None


def test_report_sentences_follow_its_table(report_file):
    from sdlens.trace import load

    text = report_file.read_text()
    tr = load(report_file.with_name("run.sdlens"))
    view = token_view(tr)
    rows = [r for r in view.rows if r.attention is not None]
    top = max(rows, key=lambda r: r.attention)
    total = sum(r.attention for r in rows)
    # the sentence names the token the table shows largest, with the table's own number
    assert f"{top.attention:.4f}" in text.split("<table>", 3)[0] or f"{top.attention:.4f}" in text
    sentence = re.search(r"layers, heads and pixels(.*?)\.</p>", text).group(1)
    assert html.escape(top.token) in sentence and f"{top.attention:.4f}" in sentence
    assert ("takes most of it" in sentence) == (top.attention / total > 0.5)
    assert "the start token takes most of it" not in text or top.position == 0
    # steps 1..N in the report's tables too
    assert "<tr><td>1</td><td>" in text and "<td>0</td><td>" not in text.split("Scheduler</h2>")[1]


def test_bad_seed_and_steps_are_usage_errors(model, tmp_path, capsys):
    for args, msg in ((["--seed", "-3"], "--seed -3 is outside 0..2**64-1"),
                      (["--steps", "0"], "--steps must be >= 1")):
        rc = main(["trace", "a red circle", "--model", model, "--out", str(tmp_path / "x.sdlens"),
                   "-q", *args])
        assert rc == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "x.sdlens").exists()


def test_info_and_inspect(run_file, capsys):
    assert main(["info", str(run_file)]) == 0
    out = capsys.readouterr().out
    assert "steps        3   CFG 4   seeds" in out  # guidance_text: the kind of guidance named
    assert "'a red circle and a blue square'  (7 of 75 tokens)" in out
    assert re.search(r"latents\s+\(4, 1, 4, 16, 16\) float32", out)
    assert "attention    7 layers, 3 steps" in out
    assert main(["inspect", str(run_file)]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == out.splitlines()[1:]


@pytest.fixture(scope="module")
def report_file(run_file):
    out = run_file.with_name("report.html")
    assert main(["report", str(run_file), "--out", str(out), "-q"]) == 0
    return out


def test_report_is_self_contained(report_file):
    text = report_file.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text)  # nothing from the network
    assert text.count("data:image/png;base64,") > 20
    frames = json.loads(re.search(r'<script type="application/json" id="frames">(.*?)</script>',
                                  text, re.S).group(1).replace("<\\/", "</"))
    assert len(frames["t"]) == 3 and len(frames["x0"]) == 3 and len(frames["xt"]) == 3
    assert set(frames["maps"]) == {"a", "red", "circle", "and", "blue", "square"}
    assert 'id="step-slider"' in text and "Not available" not in text
    for section in ("Settings", "Image and word heatmaps", "Step by step", "Tokens",
                    "When does each word commit?", "Classifier-free guidance", "Scheduler"):
        assert f"<h2>{section}</h2>" in text


@pytest.mark.slow
def test_demo_writes_everything(model, tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--model", model, "--steps", "3", "--grid-cfg", "1,5",
               "--grid-seeds", "0,1", "-q"])
    assert rc == 0
    names = {"image.png", "run.sdlens", "heatmaps.png", "steps.png", "report.html", "grid.png"}
    assert names <= {p.name for p in out.iterdir()}
    printed = capsys.readouterr().out
    for n in names:
        assert f"wrote {out / n}" in printed
    from PIL import Image

    assert Image.open(out / "image.png").size == (64, 64)
    assert Image.open(out / "grid.png").size[0] > 200


@pytest.mark.parametrize("argv,match", [
    (["info", "/no/such/file.sdlens"], "no such trace file"),
    (["report", "/no/such/file.sdlens"], "no such trace file"),
    (["trace", "a red circle", "--model", "/no/such/model", "--out", "x.sdlens"], "no such folder"),
    (["trace", "a red circle", "--steps", "0", "--out", "x.sdlens"], "--steps must be >= 1"),
    (["demo", "--grid-cfg", "a,b"], "--grid-cfg must be comma-separated numbers"),
])
def test_errors_are_one_line_with_status_2(argv, match, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = [l for l in capsys.readouterr().err.strip().splitlines() if "error" in l]
    assert len(err) == 1 and match in err[0] and err[0].startswith("sdlens ")


def test_not_a_trace_and_unknown_word(run_file, tmp_path, capsys):
    junk = tmp_path / "junk.sdlens"
    junk.write_bytes(b"hello, this is not a trace")
    assert main(["info", str(junk)]) == 2
    assert "not an sdlens trace" in capsys.readouterr().err
    assert main(["report", str(run_file), "--words", "circle,dog", "-q",
                 "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "'dog' is not a word" in err and "'circle'" in err


def _run(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "sdlens", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


@pytest.mark.slow  # two fresh interpreters (torch, diffusers imports)
def test_python_m_sdlens_usage_errors_exit_2_without_traceback(tmp_path):
    r = _run("trace", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "required: prompt" in r.stderr
    r = _run("info", str(tmp_path / "missing.sdlens"), cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no such trace file" in r.stderr


def test_help_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("demo", "trace", "report", "info"))
    with pytest.raises(SystemExit) as e:
        main(["frobnicate"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_sweep_subcommand_is_hooked_in(capsys):
    assert main(["sweep", "a red circle", "--model", "/no/such/model", "--quiet"]) == 2
    assert "sdlens sweep: error: no such folder" in capsys.readouterr().err


def test_register_adds_a_subcommand(capsys):
    from sdlens.views import cli

    seen = {}
    cli.register("echo-test", "test command", lambda p: p.add_argument("x"),
                 lambda a: seen.setdefault("x", a.x) and 0)
    try:
        assert main(["echo-test", "hello"]) == 0 and seen == {"x": "hello"}
    finally:
        cli.COMMANDS.pop("echo-test")


# --------------------------------------------------------------------------- browser
def _dom(html_path: Path, fragment: str) -> str:
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                        "--virtual-time-budget=3000", "--dump-dom",
                        html_path.as_uri() + fragment], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-500:]
    return r.stdout


def _src(dom: str, element_id: str) -> str:
    m = re.search(rf'<img[^>]*id="{element_id}"[^>]*>', dom)
    assert m, f"no #{element_id} in the page"
    return re.search(r'src="([^"]*)"', m.group(0)).group(1)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium")
def test_report_scrubber_changes_the_image_in_headless_chromium(report_file):
    out = report_file
    frames = json.loads(re.search(r'id="frames">(.*?)</script>', out.read_text(), re.S)
                        .group(1).replace("<\\/", "</"))
    # the page's script moves the slider and fires its input event (as dragging it does)
    # steps in the address and the label count 1..N, as diffusers' progress bar does
    first, last = _dom(out, "#step=1&word=circle"), _dom(out, "#step=3&word=square")
    assert _src(first, "scrub-x0") == frames["x0"][0]
    assert _src(last, "scrub-x0") == frames["x0"][2]
    assert _src(first, "scrub-x0") != _src(last, "scrub-x0")
    assert _src(first, "scrub-map") == frames["maps"]["circle"][0]
    assert _src(last, "scrub-map") == frames["maps"]["square"][2]
    assert "step 3/3" in last


# --------------------------------------------------------------------------- shipped model
shipped = pytest.mark.skipif(not shipped_model_available(), reason="shipped weights not built yet")


@pytest.mark.slow
@shipped
def test_demo_on_the_shipped_model(tmp_path):
    import time

    t0 = time.time()
    assert main(["demo", "--out", str(tmp_path), "-q"]) == 0
    assert (tmp_path / "report.html").exists() and (tmp_path / "grid.png").exists()
    print(f"demo on the shipped model: {time.time() - t0:.1f} s")


@pytest.mark.slow
@shipped
def test_shipped_model_heatmaps_lie_on_their_objects():
    """Each object word's map peaks inside that object (found by colour) and overlaps it."""
    from sdlens.analysis.heatmaps import iou
    from sdlens.models.shapes.evaluate import colour_segments, largest_blob
    from sdlens.pipeline import load_pipeline
    from sdlens.engine.session import generate

    pipe = load_pipeline(device="cpu")
    prompts = ["a red circle and a blue square", "a green triangle and a yellow circle"]
    ious, peaks = {}, []
    for prompt in prompts:
        for seed in (1000, 1001):
            tr = generate(pipe, prompt, seed=seed, steps=25, guidance_scale=7.5)
            seg = colour_segments(np.asarray(tr.images[0].convert("RGB")))
            for phrase in prompt.split(" and "):
                _, colour, shape = phrase.split()
                obj = largest_blob(seg[colour])
                if obj.sum() < 30:
                    continue  # the model did not draw this object
                for word in (colour, shape):
                    h = tr.heatmap(word).numpy()
                    y, x = np.unravel_index(h.argmax(), h.shape)
                    peaks.append(bool(obj[y, x]))
                    ious[f"{prompt}/{seed}/{word}"] = iou(h, obj)
    print("IoU per word:", json.dumps(ious, indent=1))
    print(f"mean IoU {np.mean(list(ious.values())):.3f}, peak inside {np.mean(peaks):.2f}")
    assert len(peaks) >= 8
    assert np.mean(peaks) >= 0.75
    assert np.mean(list(ious.values())) >= 0.3
