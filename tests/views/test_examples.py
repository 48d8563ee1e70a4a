"""Every script in examples/ runs top to bottom on the shipped model and writes its PNGs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_"))
# a script named transformers.py would shadow the transformers package it imports
SCRIPT_OF = {"transformers": "diffusion_transformers"}


def test_every_notebook_has_its_example_script():
    # README: "examples/ holds the same as plain scripts" — one script per notebook (and the
    # parametrized test below runs every script)
    notebooks = {SCRIPT_OF.get(p.stem, p.stem.replace("-", "_"))
                 for p in (EXAMPLES.parent / "notebooks").glob("*.ipynb")}
    assert notebooks and notebooks <= {Path(s).stem for s in SCRIPTS}, \
        sorted(notebooks - {Path(s).stem for s in SCRIPTS})


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs_on_the_shipped_model(script, tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, str(EXAMPLES / script), "--steps", "6", "--out", str(out)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    pngs = sorted(out.glob("*.png"))
    assert pngs, f"{script} wrote no PNGs: {p.stdout[-1000:]}"
    for png in pngs:
        with Image.open(png) as im:
            assert im.width >= 64 and im.height >= 64, png
            lo, hi = im.convert("L").getextrema()
            assert hi - lo > 64, f"{png.name} is blank (grey levels {lo}..{hi})"
    assert not (tmp_path / "grid.png").exists()  # nothing written outside --out
