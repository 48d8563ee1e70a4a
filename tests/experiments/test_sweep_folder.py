"""Sweep folders (``sweep(..., out=DIR)``): resume after a kill, a changed plan refused, 2 processes
under accelerate == 1 process, ``load_sweep`` lazy (memory bounded while the GridViewer opens
every cell), partial and damaged folders, ``grid.table()``. On the shipped model, few steps."""

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import sdlens
from sdlens.experiments import sweep as S
from sdlens.experiments.sweep_folder import SweepFolder

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a red circle and a blue square"
# 8 cells, one per pipeline call: a cell's bits do not depend on which cells share its call
PLAN = dict(seeds=range(4), guidance_scales=[1.0, 7.5], steps=3, max_batch=1)
CLI = [PROMPT, "--seeds", "0-3", "--cfg", "1,7.5", "--steps", "3", "--max-batch", "1", "--quiet"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return sdlens.load_pipeline(device="cpu")


@pytest.fixture(scope="module")
def reference(pipe, tmp_path_factory):
    """The uninterrupted, one-process folder of PLAN."""
    out = tmp_path_factory.mktemp("ref") / "sweep"
    S.sweep(pipe, PROMPT, out=out, progress=False, **PLAN)
    return out


@pytest.fixture(scope="module")
def small(pipe, tmp_path_factory):
    """A 2 x 2 folder (guidance x seed), 2 steps."""
    out = tmp_path_factory.mktemp("small") / "sweep"
    S.sweep(pipe, PROMPT, seeds=[0, 1], guidance_scales=[1.0, 7.5], steps=2, out=out,
            progress=False)
    return out


def env():
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="1",
             CUDA_VISIBLE_DEVICES="")
    e.pop("WORLD_SIZE", None)
    return e


def tensors_and_meta(path: Path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()["sdlens"]


def assert_same_cells(a: Path, b: Path, n: int):
    """Every cell of folder ``b`` equals folder ``a``'s exactly: PNG bytes, every trace tensor,
    the trace's JSON document."""
    ra, rb = SweepFolder(a).records(), SweepFolder(b).records()
    assert sorted(ra) == sorted(rb) == list(range(n))
    for k in range(n):
        assert ra[k]["settings"] == rb[k]["settings"]
        assert (a / "cells" / f"{k:05d}.png").read_bytes() == (b / "cells" / f"{k:05d}.png").read_bytes()
        ta, ma = tensors_and_meta(a / "cells" / f"{k:05d}.sdlens")
        tb, mb = tensors_and_meta(b / "cells" / f"{k:05d}.sdlens")
        assert ta.keys() == tb.keys() and ma == mb
        for name in ta:
            assert torch.equal(ta[name], tb[name]), (k, name)


def log_numbers(folder: Path) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for line in SweepFolder(folder).log_lines():
        out.setdefault(line["file"], []).append(line["number"])
    return out


# ----------------------------------------------------------------------------- resume
@pytest.mark.slow
def test_killed_sweep_resumes_to_the_uninterrupted_folder(reference, tmp_path):
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "sdlens.experiments.sweep", *CLI, "--folder", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list((out / "cells").glob("*.json"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]  # killed mid-run, not after
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = SweepFolder(out).records()
    assert 2 <= len(done) < 8
    partial = sdlens.load_sweep(out)  # whole cells or none: nothing damaged, the rest missing
    assert partial.problems == {} and int(partial.missing.sum()) == 8 - len(done)
    assert partial.meta["finished"] == len(done)

    again = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_same_cells(reference, out, 8)
    logs = log_numbers(out)
    assert len(logs) == 2  # the killed run and the resumed one
    numbers = [n for ns in logs.values() for n in ns]
    assert sorted(numbers) == list(range(8))  # no cell ran twice
    assert not list((out / "cells").glob(".*.tmp"))  # the killed run's temporary files went
    index = json.loads((out / "index.json").read_text())
    assert index["finished"] == index["cells"] == 8


def test_resume_skips_finished_cells_and_refuses_another_plan(pipe, small):
    before = log_numbers(small)
    grid = S.sweep(pipe, PROMPT, seeds=[0, 1], guidance_scales=[1.0, 7.5], steps=2, out=small,
                   progress=False)
    assert log_numbers(small) == before  # nothing ran again
    assert grid.shape == (2, 2) and not grid.missing.any() and grid.folder == small
    for changed, difference in [
            (dict(seeds=[0, 1, 2]), "axes.seed: the folder has [0, 1], this run [0, 1, 2]"),
            (dict(seeds=[0, 1], record="full"), "record:"),
            (dict(seeds=[0, 1], negative_prompt="blurry"), "negative_prompt:")]:
        kwargs = dict(dict(guidance_scales=[1.0, 7.5], steps=2, progress=False), **changed)
        with pytest.raises(ValueError) as e:
            S.sweep(pipe, PROMPT, out=small, **kwargs)
        assert difference in str(e.value) and "\n" not in str(e.value)
    assert log_numbers(small) == before


# ----------------------------------------------------------------------------- processes
@pytest.mark.slow
def test_two_processes_write_every_cell_once(reference, tmp_path):
    out = tmp_path / "sweep"
    run = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu",
         "-m", "sdlens.experiments.sweep", *CLI, "--folder", str(out)],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    logs = log_numbers(out)
    assert len(logs) == 2 and all(logs.values())  # both processes wrote cells
    assert sorted(n for ns in logs.values() for n in ns) == list(range(8))  # each once
    assert_same_cells(reference, out, 8)


# ----------------------------------------------------------------------------- opening
def test_load_sweep_is_lazy_and_plots(small):
    import matplotlib

    matplotlib.use("Agg")
    grid = sdlens.load(small)  # the front door opens folders too
    assert isinstance(grid, S.Grid) and grid.shape == (2, 2)
    assert grid.axes == {"guidance": [1.0, 7.5], "seed": [0, 1]}
    assert isinstance(grid.traces, S.LazyCells) and grid.traces[1, 0].meta["seeds"] == [0]
    assert grid.traces[1, 0].guidance_scale == 7.5
    img = grid.images[1, 1]
    assert np.array_equal(np.asarray(img), (grid.arrays[1, 1] * 255).round().astype(np.uint8))
    assert grid.trace(guidance=7.5, seed=1).meta["seeds"] == [1]
    fig = grid.plot()
    assert len(fig.axes) == 4


def damage(folder: Path, number: int, how: str) -> None:
    path = folder / "cells" / f"{number:05d}.sdlens"
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    else:  # same size, header overwritten
        data[8:40] = b"\xff" * 32
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "overwrite"])
def test_a_damaged_cell_gives_a_one_line_error_and_the_rest_open(small, tmp_path, how):
    folder = tmp_path / "sweep"
    shutil.copytree(small, folder)
    damage(folder, 2, how)  # guidance 7.5, seed 0
    grid = S.load_sweep(folder)
    with pytest.raises(ValueError) as e:
        grid.traces[1, 0]
    msg = str(e.value)
    assert "\n" not in msg and "guidance=7.5, seed=0" in msg and "damaged" in msg
    assert grid.status((1, 0)) == "damaged" and (1, 0) in grid.problems
    for idx in [(0, 0), (0, 1), (1, 1)]:  # the rest open
        assert grid.traces[idx].latents is not None and grid.status(idx) == "ok"
    import matplotlib

    matplotlib.use("Agg")
    with pytest.warns(UserWarning, match="1 damaged cell"):
        grid.plot()
    table = grid.table()
    assert list(table["status"]) == ["ok", "ok", "damaged", "ok"]

    from sdlens.widgets import GridViewer

    v = GridViewer(grid)
    assert len(v.panel.thumbs) == 4
    v.select(1, 0)
    assert v.viewer is None and "damaged" in v.detail_title.value
    v.select(1, 1)
    assert v.viewer is not None


def test_partial_sweep_opens_with_missing_cells_marked(small, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    folder = tmp_path / "sweep"
    shutil.copytree(small, folder)
    (folder / "cells" / "00001.json").unlink()  # guidance 1, seed 1 not finished
    grid = S.load_sweep(folder)
    assert grid.missing.tolist() == [[False, True], [False, False]]
    assert grid.meta["finished"] == 3 and grid.problems == {}
    with pytest.raises(ValueError, match="has not been run yet"):
        grid.images[0, 1]
    assert grid.image_at((0, 1)) is None and grid.image_at((0, 0)) is not None
    fig = grid.plot()
    assert any(t.get_text() == "missing" for ax in fig.axes for t in ax.texts)
    with pytest.raises(ValueError, match="partial"):
        grid.save(tmp_path / "g.sdlens")
    table = grid.table()
    assert list(table["status"]) == ["ok", "missing", "ok", "ok"]
    assert np.isnan(table.loc[1, "distance_to_reference"])


# ----------------------------------------------------------------------------- the table
def test_table_measures(pipe, small):
    import pandas as pd

    grid = S.load_sweep(small)
    table = grid.table(reference={"guidance": 7.5, "seed": 0})
    assert isinstance(table, pd.DataFrame) and len(table) == 4
    assert list(table["guidance"]) == [1.0, 1.0, 7.5, 7.5] and list(table["seed"]) == [0, 1, 0, 1]
    for word in ("red", "circle", "blue", "square"):
        mass, entropy = table[f"mass@10%:{word}"], table[f"entropy:{word}"]
        assert ((mass >= 0.1 - 1e-9) & (mass <= 1)).all() and ((entropy > 0) & (entropy <= 1)).all()
    assert table.loc[2, "distance_to_reference"] == 0
    assert (table.drop(index=2)["distance_to_reference"] > 0).all()
    assert "x0_settle_step" in table
    written = pd.read_csv(small / "table.csv")
    assert list(written.columns) == list(table.columns) and len(written) == 4
    # the same measures from the in-memory grid of the same sweep (images there are float, not
    # 8-bit: the distances agree to the PNG's rounding)
    memory = S.sweep(pipe, PROMPT, seeds=[0, 1], guidance_scales=[1.0, 7.5], steps=2,
                     progress=False).table(reference=(1, 0))
    assert list(memory.columns) == list(table.columns)
    words = [c for c in table.columns if c.startswith(("mass@", "entropy:", "x0_"))]
    np.testing.assert_allclose(memory[words].to_numpy(float), table[words].to_numpy(float),
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(memory["distance_to_reference"], table["distance_to_reference"],
                               atol=2 / 255)

    from sdlens.analysis.measures import map_concentration, x0_settle_step

    assert map_concentration(torch.ones(10, 10)) == pytest.approx((0.1, 1.0))
    one = torch.zeros(10, 10)
    one[3, 4] = 2
    assert map_concentration(one) == pytest.approx((1.0, 0.0))
    tr = grid.traces[0, 0]
    x0 = tr.x0[:, 0].double().flatten(1)
    change = ((x0[1:] - x0[:-1]).norm(dim=1) / x0[1:].norm(dim=1)).tolist()
    settle = x0_settle_step(tr, threshold=max(change) + 1e-6)
    assert settle == 1.0  # every change below the threshold: settled from the first change
    assert np.isnan(x0_settle_step(tr, threshold=min(change) / 2))


# ----------------------------------------------------------------------------- memory
def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


RSS_BOUND_MB = 32  # growth while the GridViewer opens all 64 cells (~1 MB each on disk)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc for RSS")
def test_grid_viewer_scrolls_64_cells_in_bounded_memory(pipe, tmp_path):
    from sdlens.trace.core import Trace
    from sdlens.widgets import GridViewer

    gc.collect()  # traces other tests of this process still hold are not this viewer's
    before = {id(o) for o in gc.get_objects() if isinstance(o, Trace)}
    out = tmp_path / "sweep"
    # per-head maps over all 77 positions in float32: cells big enough that holding them shows
    S.sweep(pipe, PROMPT, seeds=range(8), guidance_scales=range(1, 9), steps=1, out=out,
            progress=False, record={"heads": True, "keep_padding": True,
                                    "attention_dtype": torch.float32})
    cell_bytes = sum(f.stat().st_size for f in (out / "cells").glob("*.sdlens"))
    assert cell_bytes > 2 * RSS_BOUND_MB * 2**20  # holding every cell could not pass
    grid = S.load_sweep(out)
    viewer = GridViewer(grid)
    assert len(viewer.panel.thumbs) == 64
    viewer.select(0)
    gc.collect()
    start = peak = rss_mb()
    for flat in range(64):
        viewer.select(flat)
        assert viewer.viewer is not None
        peak = max(peak, rss_mb())
    gc.collect()
    alive = sum(isinstance(o, Trace) and id(o) not in before for o in gc.get_objects())
    assert alive <= GridViewer.KEEP_VIEWERS + 1  # the kept viewers' traces (+ one in flight)
    print(f"RSS growth while opening 64 cells: {peak - start:.1f} MB "
          f"(cells on disk {cell_bytes / 2**20:.0f} MB)")
    assert peak - start < RSS_BOUND_MB


def test_cli_folder_flag(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    S.add_sweep_parser(parser.add_subparsers())
    out = tmp_path / "sweep"
    args = parser.parse_args(["sweep", PROMPT, "--seeds", "0-1", "--cfg", "7.5", "--steps", "2",
                              "--quiet", "--folder", str(out)])
    assert args.func(args) == 0
    assert (out / "grid.png").read_bytes()[:4] == b"\x89PNG"  # --out defaults into the folder
    assert "2 of 2 cells" in capsys.readouterr().out
    grid = S.load_sweep(out)
    assert grid.axes == {"seed": [0, 1]} and grid.traces is not None  # --folder records traces
    assert json.loads((out / "index.json").read_text())["finished"] == 2
