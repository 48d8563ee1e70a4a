"""A newcomer's first screen: `import sdlens` and `sdlens demo` print sdlens's own progress and
results, and no library warnings (issue 23: transformers' torchvision notices and diffusers'
`torch_dtype` deprecation used to open the demo)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sdlens.pipeline import SHIPPED_MODEL

NOISE = ("warning", "deprecated")


def _run(args, tmp_path) -> str:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=tmp_path,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout + proc.stderr


def _noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(w in line.lower() for w in NOISE)]


def test_import_prints_nothing(tmp_path):
    assert _run(["-c", "import sdlens, sdlens.widgets"], tmp_path) == ""


@pytest.mark.skipif(not (SHIPPED_MODEL / "model_index.json").exists(), reason="no shipped model")
def test_demo_prints_no_library_warnings(tmp_path):
    text = _run(["-m", "sdlens", "demo", "--out", str(tmp_path / "demo"), "--steps", "4",
                 "--grid-cfg", "1,5", "--grid-seeds", "0"], tmp_path)
    assert "wrote" in text and _noise(text) == [], _noise(text)
