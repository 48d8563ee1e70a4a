"""The benchmark scripts keep working: ``benchmarks/run.py --quick --smoke`` (tiny sizes) into a
temporary file; every section has a table with rows. The committed RESULTS.md is not touched."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"


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
    for prefix in ("1. Overhead", "2a.", "2c.", "3a.", "3b.", "4a.", "4c.", "5.", "6.", "7."):
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
    ratio = [r for r in ov if "sdlens" in r[1]][0][-1]
    assert re.match(r"^\d+\.\d{3}x$", ratio), ratio
    # the estimate is checked against real traces
    est = next(r for t, r in _tables(md).items() if t.startswith("2c."))
    assert any("(yes)" in c or "(NO)" in c for r in est for c in r)


def test_committed_results_untouched(smoke_run):
    _, _, before, after = smoke_run
    assert before == after
