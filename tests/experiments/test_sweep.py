"""Grids: axis syntax, batched cells == single runs, chunking, traces, save/load, plot, CLI,
and a 2-process sweep under accelerate == the 1-process one."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdlens.pipeline import SHIPPED_MODEL, make_scheduler
from sdlens.testing import random_pipeline

from sdlens.experiments import sweep as S

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-4
P1, P2 = "a red circle", "a blue square and a green triangle"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return random_pipeline("sd15", seed=1)


def single(pipe, prompt, seed, g, steps, **kw):
    """The reference: one plain diffusers call."""
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), guidance_scale=g,
                num_inference_steps=steps, output_type="np", **kw).images[0]


# ----------------------------------------------------------------------------- axis syntax
@pytest.mark.parametrize("text,kind,expected", [
    ("0-7", int, [0, 1, 2, 3, 4, 5, 6, 7]),
    ("1,5,9", int, [1, 5, 9]),
    ("1,3,7.5,12", float, [1.0, 3.0, 7.5, 12.0]),
    ("1-13 [5]", float, [1.0, 4.0, 7.0, 10.0, 13.0]),
    ("1-10 (+2)", int, [1, 3, 5, 7, 9]),
    ("1-2 (+0.25)", float, [1.0, 1.25, 1.5, 1.75, 2.0]),
    ("10-1 (-3)", int, [10, 7, 4, 1]),
    ("3-1", int, [3, 2, 1]),
    ("0-1, 5, 7-9 [2]", int, [0, 1, 5, 7, 9]),
    (" 7.5 ", float, [7.5]),
    ("-1", int, [-1]),
    ([1, 2.5], float, [1.0, 2.5]),
    (range(3), int, [0, 1, 2]),
])
def test_parse_axis(text, kind, expected):
    assert S.parse_axis(text, kind) == expected


@pytest.mark.parametrize("text,kind", [
    ("", float), ("   ", int), ([], int), ("1,,2", int), ("abc", float), ("1-5 (+0)", int),
    ("1-5 (-1)", int), ("[5]", float), ("1-13 [0]", float), ("7.5", int), ("1-2 (+0.5)", int),
    ("1 2", float),
])
def test_parse_axis_rejects_with_the_allowed_syntax(text, kind):
    with pytest.raises(ValueError) as e:
        S.parse_axis(text, kind, "seeds")
    assert "seeds" in str(e.value)
    if text not in ([],):
        assert "allowed axis syntax" in str(e.value) or "empty" in str(e.value)


def test_sweep_rejects_bad_input(pipe):
    with pytest.raises(ValueError, match="empty"):
        S.sweep(pipe, [], seeds=[0], record=None, progress=False)
    with pytest.raises(ValueError, match="empty"):
        S.sweep(pipe, P1, seeds=[], record=None, progress=False)
    with pytest.raises(ValueError, match="allowed axis syntax"):
        S.sweep(pipe, P1, seeds="0-", record=None, progress=False)
    with pytest.raises(ValueError, match="unknown scheduler"):
        S.sweep(pipe, P1, scheduler="nope", record=None, progress=False)
    with pytest.raises(TypeError, match="generator"):
        S.sweep(pipe, P1, generator=torch.Generator(), record=None, progress=False)
    with pytest.raises(ValueError, match="record"):
        S.sweep(pipe, P1, record="heavy", progress=False)


# ----------------------------------------------------------------------------- cells == runs
def test_grid_cells_equal_single_runs(pipe):
    cfgs, seeds, steps = [0.5, 1.0, 3.0, 7.5], [0, 1], 4
    grid = S.sweep(pipe, [P1, P2], seeds=seeds, guidance_scales=cfgs, steps=steps, record=None,
                   progress=False)
    assert list(grid.axes) == ["prompt", "guidance", "seed"] and grid.shape == (2, 4, 2)
    assert grid.fixed == {"scheduler": None, "steps": steps}
    # one call with CFG (3 and 7.5 sharing it through per-sample guidance), one without
    assert grid.meta["batches"] == 2
    for i, p in enumerate([P1, P2]):
        for j, g in enumerate(cfgs):
            for k, s in enumerate(seeds):
                ref = single(pipe, p, s, g, steps)
                np.testing.assert_allclose(grid.arrays[i, j, k], ref, atol=ATOL, rtol=0)
                assert grid.settings((i, j, k)) == {"prompt": p, "scheduler": None, "steps": steps,
                                                    "guidance": g, "seed": s}
    # the cells really differ (no degenerate grid): guidance and seed change the image
    assert np.abs(grid.arrays[0, 2, 0] - grid.arrays[0, 3, 0]).max() > 1e-3
    assert np.abs(grid.arrays[0, 3, 0] - grid.arrays[0, 3, 1]).max() > 1e-3
    img = grid.images[1, 3]
    assert img.shape == (2,)  # images[i, j] indexes the first two axes
    assert grid.images[1, 3, 0].size == (grid.arrays.shape[-2], grid.arrays.shape[-3])
    assert grid.cell(prompt=P2, guidance=7.5, seed=0) is grid.images[1, 3, 0]


def test_one_axis_and_per_sample_hook_restored(pipe):
    fwd, pre = dict(pipe.unet._forward_hooks), dict(pipe.unet._forward_pre_hooks)
    grid = S.sweep(pipe, P1, seeds=3, guidance_scales="2-8 [3]", steps=3, record=None,
                   progress=False)
    assert list(grid.axes) == ["guidance"] and grid.fixed["seed"] == 3
    for j, g in enumerate([2.0, 5.0, 8.0]):
        np.testing.assert_allclose(grid.arrays[j], single(pipe, P1, 3, g, 3), atol=ATOL, rtol=0)
    assert dict(pipe.unet._forward_hooks) == fwd and dict(pipe.unet._forward_pre_hooks) == pre


def test_guidance_rescale_runs_each_scale_alone(pipe):
    grid = S.sweep(pipe, P1, seeds=[0, 1], guidance_scales=[3.0, 7.5], steps=3, record=None,
                   progress=False, guidance_rescale=0.7)
    assert grid.meta["batches"] == 2  # rescale reads the raw text prediction: no mixing
    for j, g in enumerate([3.0, 7.5]):
        for k in range(2):
            ref = single(pipe, P1, k, g, 3, guidance_rescale=0.7)
            np.testing.assert_allclose(grid.arrays[j, k], ref, atol=ATOL, rtol=0)


def test_scheduler_and_steps_axes(pipe):
    original = pipe.scheduler
    grid = S.sweep(pipe, P1, seeds=[5], guidance_scales=[4.0], steps=[2, 4],
                   scheduler=["ddim", "euler"], record=None, progress=False)
    assert pipe.scheduler is original
    assert list(grid.axes) == ["scheduler", "steps"] and grid.meta["batches"] == 4
    for i, name in enumerate(["ddim", "euler"]):
        for j, n in enumerate([2, 4]):
            pipe.scheduler = make_scheduler(name, original.config)
            try:
                ref = single(pipe, P1, 5, 4.0, n)
            finally:
                pipe.scheduler = original
            np.testing.assert_allclose(grid.arrays[i, j], ref, atol=ATOL, rtol=0)
    assert np.abs(grid.arrays[0, 1] - grid.arrays[1, 1]).max() > 1e-3


def test_sdxl_grid_equals_single_runs():
    pipe = random_pipeline("sdxl")
    grid = S.sweep(pipe, P1, seeds=[0, 1], guidance_scales=[1.0, 2.0, 6.0], steps=3, record=None,
                   progress=False)
    for j, g in enumerate([1.0, 2.0, 6.0]):
        for k in range(2):
            np.testing.assert_allclose(grid.arrays[j, k], single(pipe, P1, k, g, 3), atol=ATOL,
                                       rtol=0)


def test_img2img_grid_equals_single_runs():
    from PIL import Image

    pipe = random_pipeline("sd15", task="img2img")
    img = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    grid = S.sweep(pipe, P1, seeds=[0, 1], guidance_scales=[1.0, 3.0, 6.0], steps=4, progress=False,
                   record=None, image=img, strength=0.6)
    for j, g in enumerate([1.0, 3.0, 6.0]):
        for k in range(2):
            ref = single(pipe, P1, k, g, 4, image=img, strength=0.6)
            np.testing.assert_allclose(grid.arrays[j, k], ref, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- memory budget
@pytest.mark.parametrize("arch", ["z-image", "qwen-image", "flux2-klein"])
def test_memory_estimate_reads_each_transformers_config(arch):
    """A sweep's memory estimate on the 2026 transformers (Z-Image names its width n_heads / dim):
    positive, and larger for larger images."""
    p = random_pipeline(arch, seed=0)
    small, big = S.estimate_cell_bytes(p, 64, 64), S.estimate_cell_bytes(p, 512, 512)
    assert 0 < small < big


def test_chunking_by_memory_budget(pipe):
    per = S.estimate_cell_bytes(pipe, cfg=True)
    assert per > 0 and S.estimate_cell_bytes(pipe, cfg=False) < per
    assert S.estimate_cell_bytes(pipe, 512, 512) > S.estimate_cell_bytes(pipe, 64, 64)
    whole = S.sweep(pipe, P1, seeds="0-3", guidance_scales=[3, 7], steps=3, record=None,
                    progress=False)
    assert whole.meta["batches"] == 1
    chunked = S.sweep(pipe, P1, seeds="0-3", guidance_scales=[3, 7], steps=3, record=None,
                      progress=False, memory_budget=int(per * 3.5))
    assert chunked.meta["batches"] == 3  # 8 cells, 3 per call
    np.testing.assert_allclose(chunked.arrays, whole.arrays, atol=ATOL, rtol=0)
    capped = S.sweep(pipe, P1, seeds="0-3", guidance_scales=[3, 7], steps=3, record=None,
                     progress=False, max_batch=4)
    assert capped.meta["batches"] == 2
    with pytest.raises(ValueError, match="does not fit one pipeline call.*memory budget"):
        S.sweep(pipe, P1, seeds="0-3", guidance_scales=[3, 7], steps=3, record=None,
                progress=False, memory_budget=int(per * 3.5), chunk=False)
    with pytest.raises(ValueError, match="max_batch=4"):
        S.sweep(pipe, P1, seeds="0-3", guidance_scales=[3, 7], steps=3, record=None,
                progress=False, max_batch=4, chunk=False)


# ----------------------------------------------------------------------------- traces
def test_grid_traces_equal_single_traces(pipe):
    import sdlens.engine.session as rec

    grid = S.sweep(pipe, [P1, P2], seeds=[0, 1], guidance_scales=[1.0, 3.0, 7.5], steps=4,
                   record="full", progress=False)
    for (i, p), (j, g), (k, s) in [((0, P1), (1, 3.0), (1, 1)), ((1, P2), (2, 7.5), (0, 0)),
                                   ((0, P1), (0, 1.0), (0, 0))]:
        tr = grid.traces[i, j, k]
        ref = rec.generate(pipe, p, seed=s, steps=4, guidance_scale=g)
        assert tr.prompts == [p] and tr.batch_size == 1 and tr.meta["seeds"] == [s]
        assert tr.guidance_scale == g and tr.do_cfg == (g > 1)
        assert tr.tokens == ref.tokens
        for name in ("latents", "x0", "noise", "noise_text", "noise_uncond"):
            a, b = getattr(tr, name), getattr(ref, name)
            if b is None:
                assert a is None, name
                continue
            assert a.shape == b.shape, name
            # noise_text is the model's own text prediction, not the per-sample rewrite
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
        for layer in ref.attention.layers:
            assert tr.attention[layer].shape == ref.attention[layer].shape
            torch.testing.assert_close(tr.attention[layer].float(), ref.attention[layer].float(),
                                       atol=2e-3, rtol=0)
        np.testing.assert_array_equal(np.asarray(tr.images[0]), np.asarray(grid.images[i, j, k]))


def test_light_traces_and_save_load(pipe, tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    grid = S.sweep(pipe, P1, seeds=[0, 1], guidance_scales=[1.5, 6.0], steps=10, progress=False)
    tr = grid.traces[1, 0]
    n = tr.num_steps  # PNDM (SD 1.5's scheduler) takes one step more than asked
    assert tr.noise is None and tr.latents.shape[:2] == (n + 1, 1) and tr.x0.shape[:2] == (n, 1)
    assert tr.attention.steps == list(range(n))[::2]  # every 2nd step: ~5 of 10
    path = grid.save(tmp_path / "grid.sdlens")
    assert S.is_grid_file(path) and not S.is_grid_file(tmp_path / "missing")
    back = S.Grid.load(path)
    assert back.axes == grid.axes and back.fixed == grid.fixed
    np.testing.assert_array_equal(back.arrays, grid.arrays)
    t2 = back.traces[1, 0]
    torch.testing.assert_close(t2.latents, tr.latents)
    layer = tr.attention.layers[0]
    torch.testing.assert_close(t2.attention[layer], tr.attention[layer])
    assert t2.guidance_scale == 6.0 and t2.prompts == [P1]
    tr.save(tmp_path / "one.sdlens")
    with pytest.raises(ValueError, match="not an sdlens grid"):
        S.Grid.load(tmp_path / "one.sdlens")
    fig = back.plot()
    titles = [ax.get_title() for ax in fig.axes]
    rows = [ax.get_ylabel() for ax in fig.axes]
    assert titles[:2] == ["seed 0", "seed 1"] and rows[0] == "CFG 1.5" and rows[2] == "CFG 6"
    assert P1 in fig._suptitle.get_text()
    assert back._repr_png_()[:4] == b"\x89PNG"


# ----------------------------------------------------------------------------- CLI + processes
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, pipe):
    folder = tmp_path_factory.mktemp("model")
    pipe.save_pretrained(folder)
    return folder


CLI_ARGS = [P1, "a green square", "--seeds", "0-2", "--cfg", "1,4", "--steps", "3", "--quiet"]


def test_cli_run_sweep(saved_model, tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    S.add_sweep_parser(sub)
    args = parser.parse_args(["sweep", *CLI_ARGS, "--model", str(saved_model),
                              "--out", str(tmp_path / "g.png"), "--traces", str(tmp_path / "g.sdlens")])
    assert args.func is S.run_sweep
    assert args.func(args) == 0
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    grid = S.Grid.load(tmp_path / "g.sdlens")
    assert grid.shape == (2, 2, 3) and grid.traces is not None
    from sdlens.pipeline import load_pipeline

    pipe = load_pipeline(saved_model, device="cpu")
    np.testing.assert_allclose(grid.arrays[1, 1, 2], single(pipe, "a green square", 2, 4.0, 3),
                               atol=ATOL, rtol=0)
    with pytest.raises(SystemExit):
        parser.parse_args(["sweep"])  # a prompt is required


@pytest.mark.slow
def test_two_process_sweep_equals_one_process(saved_model, tmp_path):
    # accelerate's --cpu alone starts one process (its multi-CPU launch goes through mpirun);
    # --multi_gpu starts the processes with torchrun and sdlens then uses gloo on the CPU
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="1",
               CUDA_VISIBLE_DEVICES="")
    env.pop("WORLD_SIZE", None)
    common = [*CLI_ARGS, "--model", str(saved_model)]
    one = subprocess.run([sys.executable, "-m", "sdlens.experiments.sweep", *common, "--out",
                          str(tmp_path / "one.png"), "--traces", str(tmp_path / "one.sdlens")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                          "--multi_gpu", "-m", "sdlens.experiments.sweep", *common, "--out",
                          str(tmp_path / "two.png"), "--traces", str(tmp_path / "two.sdlens")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("wrote") == 2  # only the main process writes (png + traces)
    a, b = S.Grid.load(tmp_path / "one.sdlens"), S.Grid.load(tmp_path / "two.sdlens")
    assert a.meta["processes"] == 1 and b.meta["processes"] == 2
    assert a.axes == b.axes and b.arrays.shape == a.arrays.shape and a.shape == (2, 2, 3)
    np.testing.assert_allclose(b.arrays, a.arrays, atol=ATOL, rtol=0)
    for idx in np.ndindex(*a.shape):
        assert b.traces[idx].prompts == a.traces[idx].prompts
        assert b.traces[idx].meta["seeds"] == a.traces[idx].meta["seeds"]
        torch.testing.assert_close(b.traces[idx].latents, a.traces[idx].latents, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- shipped model
SHIPPED = SHIPPED_MODEL


@pytest.mark.skipif(not (SHIPPED / "model_index.json").exists(), reason="shipped weights not built yet")
def test_shipped_model_grid_cells_equal_single_runs():
    from sdlens.pipeline import load_pipeline

    pipe = load_pipeline(device="cpu")
    cfgs = [1.0, 3.0, 7.5]
    grid = S.sweep(pipe, "a red circle and a blue square", seeds=[0, 1], guidance_scales=cfgs,
                   steps=10, record=None, progress=False)
    for j, g in enumerate(cfgs):
        for k in range(2):
            ref = single(pipe, "a red circle and a blue square", k, g, 10)
            np.testing.assert_allclose(grid.arrays[j, k], ref, atol=ATOL, rtol=0)


def test_seeds_outside_the_generators_range_are_refused():
    # the same check as generate(): torch would wrap a negative seed silently
    pipe = random_pipeline("shapes")
    for bad in (-3, 2**64):
        with pytest.raises(ValueError, match=r"0\.\.2\*\*64-1"):
            S.sweep(pipe, "a red circle", seeds=[0, bad], guidance_scales=[7.5], steps=2,
                    record=None, progress=False)
