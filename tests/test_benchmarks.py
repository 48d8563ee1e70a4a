"""The benchmark scripts keep working: ``benchmarks/run.py --quick --smoke`` (tiny sizes) into a
temporary file; every section has a table with rows, every timing row >= 5 rounds (grids >= 3)
with a per-round spread. The committed RESULTS.md is not touched. README.md's benchmark paragraph
is exactly what ``benchmarks/publish.py`` writes from the committed ``benchmarks/results.json``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
sys.path.insert(0, str(REPO / "benchmarks"))

import common  # noqa: E402  (benchmarks/common.py)
import publish  # noqa: E402  (benchmarks/publish.py)


def _tables(md: str) -> dict[str, list[list[str]]]:
    """title (#### line) -> data rows of the markdown table under it."""
    out, title, rows = {}, None, None
    for line in md.splitlines():
        if line.startswith("#### "):
            title, rows = line[5:].strip(), []
            out[title] = rows
        elif title is not None and line.startswith("|") and not re.match(r"^\|(-+\|)+$", line):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return {t: r[1:] for t, r in out.items()}  # drop the header row


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "RESULTS.md"
    before = RESULTS.read_bytes() if RESULTS.exists() else None
    env = dict(os.environ, SDLENS_DAAM_VENV=str(out.parent / "no-daam-venv"))
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run.py"), "--quick", "--smoke",
                        "--out", str(out)], capture_output=True, text=True, timeout=600, env=env,
                       cwd=str(REPO))
    after = RESULTS.read_bytes() if RESULTS.exists() else None
    return p, out, before, after


def test_smoke_run_writes_tables(smoke_run):
    p, out, before, after = smoke_run
    assert out.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    md = out.read_text()
    assert "FAILED —" not in md and "— FAILED" not in md, md
    tables = _tables(md)
    for prefix in ("1. Overhead", "1b.", "2a.", "2c.", "3a.", "3b.", "3c.", "4a.", "4c.", "5.",
                   "6.", "7."):
        hits = [t for t in tables if t.startswith(prefix)]
        assert hits, f"no table {prefix!r} in {list(tables)}"
        assert all(tables[t] for t in hits), f"table {hits} has no rows"
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]


def test_smoke_run_header_and_numbers(smoke_run):
    _, out, _, _ = smoke_run
    md = out.read_text()
    assert "Mode: **smoke**" in md
    for key in ("| CPU |", "| torch threads |", "| device / dtype |", "| GPU |",
                "load average (1/5/15 min) before"):
        assert key in md
    ov = next(r for t, r in _tables(md).items() if t.startswith("1. Overhead"))
    sdl = [r for r in ov if "sdlens" in r[1]][0]
    # ratio: median of per-round ratios (min-max); >= 5 rounds per side
    assert re.match(r"^\d+\.\d{3}x \(\d+\.\d{3}–\d+\.\d{3}\)$", sdl[-2]), sdl
    assert int(sdl[-3]) >= 5
    runs_column = {"1. Overhead": 5, "2a.": 4, "3b.": 4}
    for title, rows in _tables(md).items():
        for prefix, col in runs_column.items():
            if title.startswith(prefix):
                assert all(int(r[col]) >= 5 for r in rows), (title, rows)
    grid = next(r for t, r in _tables(md).items() if t.startswith("5."))
    assert all(int(r[-1]) >= 3 and r[-2].startswith("yes") for r in grid), grid
    # the estimate is checked against real traces
    est = next(r for t, r in _tables(md).items() if t.startswith("2c."))
    assert any("(yes)" in c or "(NO)" in c for r in est for c in r)


def test_committed_results_untouched(smoke_run):
    _, _, before, after = smoke_run
    assert before == after


def test_smoke_run_results_file_feeds_publish(smoke_run):
    """The run writes the small results file, and publish.py turns it into a paragraph that
    carries its figures, verdicts and load."""
    _, out, _, _ = smoke_run
    r = json.loads(out.with_suffix(".results.json").read_text())
    figs = r["figures"]
    for key in ("overhead_sd15", "overhead_sd15_per_step", "overhead_shipped", "daam_method_sd15",
                "estimate_error", "default_trace_mb", "grid_shipped", "saveload_open_s",
                "overhead_sd3"):
        assert key in figs, sorted(figs)
    # what cannot run here is said, not left out: no DAAM venv in this test; Flux where its test
    # bed does not exist yet
    assert "daam_heatmap_corr" in r["not_run"] and "daam_heatmap_corr" not in figs
    for key in ("overhead_flux", "flux_trace_mb"):
        assert (key in figs) != (key in r["not_run"]), key
    f = figs["overhead_sd15"]
    assert f["n"] >= 5 and f["min"] <= f["median"] <= f["max"]
    assert ("within noise" in f["verdict"]) == (f["min"] <= 1.0 <= f["max"])
    text = publish.paragraph(r)
    assert f"**{f['median']:.3f}x** ({f['verdict']})" in text
    assert ("loaded machine" in text) == bool(r["loaded"])
    assert f"**{figs['overhead_sd3']['median']:.3f}x** ({figs['overhead_sd3']['verdict']})" in text
    for key, why in r["not_run"].items():
        assert f"`{key}` ({why})" in text


@pytest.mark.parametrize("ratios, words", [
    ([0.97, 1.02, 1.05, 0.99, 1.01], "within noise (0.970–1.050)"),
    ([1.04, 1.06, 1.05, 1.08, 1.07], "6.0% slower (1.040–1.080)"),
    ([0.90, 0.95, 0.92, 0.93, 0.94], "7.0% faster (0.900–0.950)"),
])
def test_a_spread_covering_one_is_within_noise(ratios, words):
    assert common.verdict(common.spread(ratios)) == words


def test_targets_need_the_whole_spread():
    sp = common.spread([1.02, 1.04, 1.12])
    assert common.target_status(sp, 1.10) == "undecided"
    assert common.target_status(common.spread([1.02, 1.04]), 1.10) == "meets"
    assert common.target_status(common.spread([1.12, 1.2]), 1.10) == "misses"
    assert "MISSES the goal <= 1.03x" in common.verdict(common.spread([1.04, 1.05]), 1.10, 1.03)


def test_round_ratios_pair_rounds():
    assert common.round_ratios([2.0, 3.0], [1.0, 2.0]) == [2.0, 1.5]
    with pytest.raises(ValueError):
        common.round_ratios([1.0], [1.0, 2.0])


def test_readme_paragraph_is_written_from_the_results_file():
    """README.md's benchmark paragraph equals what publish.py writes from the committed
    benchmarks/results.json: no figure is typed by hand."""
    readme = (REPO / "README.md").read_text()
    r = publish.load_results()
    assert readme == publish.render(readme, r), (
        "README.md's benchmark paragraph differs from benchmarks/results.json: run "
        "python benchmarks/publish.py")
    # every ratio figure appears with its verdict; misses with their targets
    text = publish.paragraph(r)
    for key in ("overhead_sd15", "overhead_shipped", "overhead_sd3", "overhead_flux",
                "daam_0_2_0_256px", "daam_0_2_0_512px"):
        if key in r["figures"]:
            assert r["figures"][key]["verdict"] in text
    if "daam_heatmap_corr" in r["figures"]:  # the DAAM 0.2.0 comparison, with its target
        f = r["figures"]["daam_heatmap_corr"]
        assert f"**{f['median']:.4f}** (target >= {f['target']:g}" in text
    for f in r["figures"].values():
        if f["kind"] == "value" and f.get("target_status") == "misses" and f["label"]:
            assert f"target {f['target_text']}: **MISSED**" in text


# ---------------------------------------------------------------- 1024-px token counts (issue 29)
import bench_1024  # noqa: E402  (benchmarks/bench_1024.py)


def test_1024_smoke_run_writes_its_record(tmp_path):
    """``bench_1024.py`` at tiny sizes (the full-width builder and the profile included): the
    record has every asked row with >= 5 paired rounds, its verdict and target status, the
    checkout and the load; the markdown beside it is what ``render`` writes from it."""
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_1024.py"), "--smoke",
                        "--only", "sd3", "flux-narrow", "--profile", "--out-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=str(REPO))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((tmp_path / "1024-smoke.json").read_text())
    assert not r["partial"] and r["mode"] == "smoke"
    assert r["checkout"]["commit"] and r["load_start"] and r["machine"]["torch_threads"] == 1
    assert sorted(r["rows"]) == ["flux-narrow", "sd3"]
    for key, f in r["rows"].items():
        assert f["n"] >= 5 and len(f["untraced_s"]["times_s"]) == len(f["traced_s"]["times_s"]) >= 5
        assert f["min"] <= f["median"] <= f["max"]
        assert f["target"] == bench_1024.TARGETS[key]
        assert ("within noise" in f["verdict"]) == (f["min"] <= 1.0 <= f["max"])
        assert f["sites"] and f["image_tokens"] == 16  # 64 px: 8 x 8 latents, 2 x 2 patches
    assert any("text_probabilities" in l or "sdlens" in l for l in r["profile"]["cprofile_cumulative"])
    md = (tmp_path / "RESULTS-1024.md").read_text()
    assert md == bench_1024.render([r])
    assert f"**{r['rows']['sd3']['median']:.3f}x**" in md


def test_1024_markdown_is_written_from_the_results_files():
    """benchmarks/RESULTS-1024.md is what bench_1024.py writes from the committed
    benchmarks/results/1024-*.json: no figure is typed by hand."""
    recs = bench_1024.load_records()
    assert recs, "no benchmarks/results/1024-*.json committed"
    assert bench_1024.MARKDOWN.read_text() == bench_1024.render(recs), (
        "benchmarks/RESULTS-1024.md differs from benchmarks/results/1024-*.json: run "
        "python benchmarks/bench_1024.py --publish")
    for r in recs:
        assert r["mode"] != "smoke" and not r["partial"]
        for key, f in r["rows"].items():
            if "error" in f:
                continue
            assert f["n"] >= 5 and f["target"] == bench_1024.TARGETS[key]
            assert f["target_status"] == common.target_status(f, f["target"])


DIFFUSERS_TESTS_MD = sorted((REPO / "benchmarks" / "results").glob("diffusers_tests*.md"))


def test_every_diffusers_tests_markdown_has_its_json():
    assert len(DIFFUSERS_TESTS_MD) >= 3  # diffusers_tests, -kernel-seam, -2026
    for md in DIFFUSERS_TESTS_MD:
        assert md.with_suffix(".json").exists(), f"{md.name} has no json beside it"


@pytest.mark.parametrize("md_path", DIFFUSERS_TESTS_MD, ids=lambda p: p.name)
def test_diffusers_tests_markdown_is_written_from_its_json(md_path):
    """Every benchmarks/results/diffusers_tests*.md is what check_diffusers_tests.py renders
    from the committed json beside it (no figure typed by hand), and the json's counts are its
    lists' lengths."""
    import check_diffusers_tests as check  # noqa: E402  (benchmarks/check_diffusers_tests.py)

    path = md_path.with_suffix(".json")
    r = json.loads(path.read_text())
    md = md_path.read_text()
    assert md == check.render(r), (f"{md_path.name} differs from {path.name}: run python "
                                   f"benchmarks/check_diffusers_tests.py --render --out {path}")
    assert "json" not in r or r["json"] == path.name  # the json the markdown names
    s = r["summary"]
    assert s["outcomes_differing"] == len(s["differing"])
    assert s["sdlens_exceptions"] == len(s["sdlens_exception_list"])
    assert s["pipelines_changed"] == len(s["changed_list"])
    assert s["tests_run"] > 0 and set(r["families"]) <= set(check.FAMILIES)
    # README: diffusers' fast tests "end the same way" traced and untraced
    assert s["outcomes_differing"] == s["sdlens_exceptions"] == s["pipelines_changed"] == 0
    assert (f"| {s['tests_run']} | **{s['outcomes_differing']}** | **{s['sdlens_exceptions']}** | "
            f"**{s['pipelines_changed']}** |") in md
