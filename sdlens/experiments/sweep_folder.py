"""A sweep on disk: one folder that a sweep writes cell by cell, resumes, and opens lazily.

Layout of ``sdlens.sweep(..., out="runs/cfg-seed")`` (``sdlens sweep ... --folder DIR``)::

    runs/cfg-seed/
      manifest.json          the plan: axes, pipeline identity, recording options, versions
      cells/00042.sdlens     cell 42's trace (the trace file format: Trace.save / sdlens.load)
      cells/00042.png        its image (8-bit RGB)
      cells/00042.json       its record, written last: the cell is finished once this exists
      logs/<run>-rank<k>.jsonl  one line per cell a process wrote (when, how long): provenance
      index.json             the finished cells, rewritten at the end of each run
      table.csv              ``grid.table()``'s measures, when asked for

Cells are numbered in C order over the five axes (prompt, scheduler, steps, guidance, seed:
``np.ravel_multi_index``). Every file is written to a temporary name in the same folder and
renamed (``os.replace``): a killed process leaves whole cells or none. A cell's record is the
source of truth for "finished"; ``index.json`` is a summary (``load_sweep`` reads the records).
Each process only writes the cells it ran and its own log file, so processes on several
machines can share one folder on a shared file system without locks.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

MANIFEST, INDEX, TABLE = "manifest.json", "index.json", "table.csv"
CELLS, LOGS = "cells", "logs"
FOLDER_FORMAT = "sdlens.sweep-folder"
FOLDER_VERSION = 1
# manifest keys a resumed run must match exactly (``versions`` and ``created`` may differ)
PLAN_KEYS = ("axes", "negative_prompt", "height", "width", "record", "pipe_kwargs", "pipeline",
             "guidance")


# ---------------------------------------------------------------------------- atomic files

_UMASK = os.umask(0)
os.umask(_UMASK)


def share(path: Path) -> None:
    """Give a written file the permissions the umask allows (temporary files are 0600), so
    that the other users of a shared sweep folder can read it."""
    os.chmod(path, 0o666 & ~_UMASK)


def write_atomic(path: Path, data: bytes | Callable[[str], None]) -> None:
    """Write ``path`` through a temporary file in its folder and ``os.replace``: readers see the
    old file or the whole new one. ``data``: bytes, or a function that writes a given path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        share(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


# ---------------------------------------------------------------------------- the plan

def versions() -> dict:
    """The versions that produced a folder (recorded; a resume with others only warns)."""
    import diffusers
    import torch
    import transformers

    from sdlens.version import __version__

    return {"sdlens": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def plan_difference(old: dict, new: dict) -> str | None:
    """The first way ``new`` (a manifest) differs from ``old`` in its plan, in a few words, or
    None when the plans match (JSON round-trip: tuples and lists compare equal)."""
    old = json.loads(json.dumps(old))
    new = json.loads(json.dumps(new))
    for m in (old, new):  # axes are ordered pairs; compare them by name
        if isinstance(m.get("axes"), list):
            m["axes"] = {a: v for a, v in m["axes"]}
    for key in PLAN_KEYS:
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                if a.get(k) != b.get(k):
                    return f"{key}.{k}: the folder has {_short(a.get(k))}, this run {_short(b.get(k))}"
        return f"{key}: the folder has {_short(a)}, this run {_short(b)}"
    return None


def _short(v: Any, n: int = 80) -> str:
    text = json.dumps(v)
    return text if len(text) <= n else text[: n - 3] + "..."


def cell_number(index: tuple, full_shape: tuple) -> int:
    """A cell's number in the folder (C order over the five axes)."""
    return int(np.ravel_multi_index(tuple(int(i) for i in index), full_shape))


class SweepFolder:
    """The folder of one sweep. ``SweepFolder(path)`` opens an existing one (its manifest);
    :meth:`start` creates or resumes one for a plan."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        file = self.path / MANIFEST
        if not file.is_file():
            what = "no such folder" if not self.path.exists() else f"no {MANIFEST} in it"
            raise FileNotFoundError(f"{self.path} is not a sweep folder ({what}); sweep folders "
                                    f"are written by sdlens.sweep(..., out=FOLDER)")
        try:
            self.manifest = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{file} is damaged: {e}") from None
        if self.manifest.get("format") != FOLDER_FORMAT:
            raise ValueError(f"{file} is not an sdlens sweep manifest")
        if int(self.manifest.get("format_version", 0)) > FOLDER_VERSION:
            raise ValueError(f"{self.path} was written by a newer sdlens (sweep folder format "
                             f"{self.manifest['format_version']}); upgrade sdlens")
        self.run_id = None
        self._log = None

    # -- creating / resuming ------------------------------------------------------------------
    @classmethod
    def start(cls, path: str | os.PathLike, manifest: dict, state=None) -> "SweepFolder":
        """Create the folder for ``manifest`` or resume it. A folder with another plan raises
        ValueError naming the first difference. ``state``: accelerate's PartialState with more
        than one process (every process checks; the main one writes the manifest)."""
        path = Path(path).expanduser()
        if path.exists() and not path.is_dir():
            raise ValueError(f"out={str(path)!r} exists and is not a folder")
        manifest = dict(manifest, format=FOLDER_FORMAT, format_version=FOLDER_VERSION,
                        versions=versions())
        file = path / MANIFEST
        if file.exists():  # every process reads the same file: all raise, or none does
            old = cls(path).manifest
            diff = plan_difference(old, manifest)
            if diff is not None:
                raise ValueError(f"{path} holds another sweep ({diff}); use a new folder, or "
                                 f"run the folder's plan to resume it")
            if old.get("versions") != manifest["versions"]:
                warnings.warn(f"{path} was started with {old.get('versions')}; resuming with "
                              f"{manifest['versions']} (cells may differ in float rounding)",
                              stacklevel=3)
        elif path.exists() and any(path.iterdir()):
            raise ValueError(f"out={str(path)!r} is a folder with files and no {MANIFEST}; give "
                             f"an empty or new folder")
        if state is not None:
            state.wait_for_everyone()
        if state is None or state.is_main_process:
            if not file.exists():
                write_json(file, dict(manifest, created=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                      time.gmtime())))
            # temporary files a killed run left (no process of this launch is writing yet)
            for tmp in (path / CELLS).glob(".*.tmp") if (path / CELLS).is_dir() else []:
                tmp.unlink(missing_ok=True)
        if state is not None:
            state.wait_for_everyone()
        folder = cls(path)
        rank = state.process_index if state is not None else 0
        # each process names its own run (a launch-wide id would need a broadcast)
        folder.run_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
        folder._log = path / LOGS / f"{folder.run_id}-rank{rank}.jsonl"
        return folder

    # -- cells --------------------------------------------------------------------------------
    @property
    def full_shape(self) -> tuple:
        return tuple(len(v) for _, v in self.manifest["axes"])

    def cell_path(self, number: int, suffix: str) -> Path:
        return self.path / CELLS / f"{number:05d}{suffix}"

    def records(self) -> dict[int, dict]:
        """``{cell number: record}`` of the finished cells (records that do not parse are left
        out: their cell counts as not run)."""
        out = {}
        folder = self.path / CELLS
        if not folder.is_dir():
            return out
        for entry in os.scandir(folder):
            name = entry.name
            if not name.endswith(".json") or name.startswith("."):
                continue
            try:
                rec = json.loads(Path(entry.path).read_text())
                out[int(rec["number"])] = rec
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return out

    def write_cell(self, number: int, settings: dict, image: np.ndarray, trace,
                   seconds: float, started: float | None = None) -> dict:
        """Write one finished cell: trace file, PNG image, then its record (the commit).
        ``image``: float (H, W, 3) in [0, 1]; ``trace``: a Trace or None; ``seconds``: its share
        of its pipeline call; ``started``: when that call started (``time.time()``)."""
        from PIL import Image

        files = {}
        if trace is not None:
            trace_path = self.cell_path(number, ".sdlens")
            trace.save(trace_path)  # atomic (Trace.save writes a temporary file and renames)
            share(trace_path)
            files["trace"] = trace_path.name
        png = self.cell_path(number, ".png")
        pil = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
        write_atomic(png, lambda tmp: pil.save(tmp, format="PNG"))
        files["image"] = png.name
        sizes = {k: (self.path / CELLS / v).stat().st_size for k, v in files.items()}
        rec = {"number": number, "settings": settings, "files": files, "bytes": sizes,
               "seconds": round(float(seconds), 4), "run": self.run_id, "pid": os.getpid()}
        write_json(self.cell_path(number, ".json"), rec)
        if self._log is not None:
            self._log.parent.mkdir(parents=True, exist_ok=True)
            with open(self._log, "a") as f:  # this process's own file: no concurrent writers
                f.write(json.dumps({"number": number, "time": time.time(),
                                    "started": started, "seconds": rec["seconds"]}) + "\n")
        return rec

    def write_index(self) -> dict:
        """Rewrite ``index.json`` (the finished cells and their files) from the records."""
        recs = self.records()
        total = int(np.prod(self.full_shape))
        index = {"cells": total, "finished": len(recs),
                 "bytes": sum(sum(r.get("bytes", {}).values()) for r in recs.values()),
                 "finished_cells": {str(k): recs[k]["files"] for k in sorted(recs)}}
        write_json(self.path / INDEX, index)
        return index

    def log_lines(self) -> list[dict]:
        """Every line of every process's log: ``number``, ``time`` (written), ``started`` (its
        pipeline call's start), ``seconds`` (its share of the call), ``file`` (the log's name)."""
        out = []
        folder = self.path / LOGS
        for file in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
            for line in file.read_text().splitlines():
                if line.strip():
                    out.append(dict(json.loads(line), file=file.name))
        return out


# ---------------------------------------------------------------------------- lazy cells

class LazyCells:
    """An array-like of a folder's cells along a grid's axes, opened on access (nothing kept).

    ``cells[i, j]`` (one int per axis) returns ``opener(record)``; a cell not run yet raises
    ValueError ("not run yet"), a cell whose file is damaged raises ValueError with one line
    naming the cell and the problem. ``shape``, ``ndim``, ``len`` and iteration (flat, C order)
    work as on a numpy array of objects.
    """

    def __init__(self, shape: tuple, locate: Callable[[tuple], tuple[int, dict | None]],
                 opener: Callable[[dict], Any], describe: Callable[[tuple], str],
                 problems: dict, what: str):
        self.shape = tuple(shape)
        self._locate, self._open, self._describe = locate, opener, describe
        self._problems = problems  # shared with the grid: {index: one-line reason}
        self._what = what

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 1

    def __iter__(self) -> Iterable:
        for idx in np.ndindex(*self.shape):
            yield self[idx]

    def __repr__(self) -> str:
        return f"LazyCells({self._what}, shape={self.shape})"

    def __getitem__(self, index) -> Any:
        index = (index,) if isinstance(index, (int, np.integer)) else tuple(index)
        if len(index) != len(self.shape) or not all(isinstance(i, (int, np.integer)) for i in index):
            raise IndexError(f"give one int per axis ({len(self.shape)}), got {index!r}")
        index = tuple(int(i) % n if -n <= int(i) < n else _out_of_range(i, n)
                      for i, n in zip(index, self.shape))
        number, rec = self._locate(index)
        if index in self._problems:
            raise ValueError(self._problems[index])
        if rec is None:
            raise ValueError(f"cell {self._describe(index)} has not been run yet (a partial "
                             f"sweep: resume it by running the sweep again)")
        try:
            return self._open(rec)
        except (OSError, ValueError, SyntaxError) as e:  # PIL raises SyntaxError for bad PNGs
            reason = " ".join(str(e).split())
            self._problems[index] = (f"cell {self._describe(index)} (cells/{number:05d}) is "
                                     f"damaged: {reason}")
            raise ValueError(self._problems[index]) from None


def _out_of_range(i, n):
    raise IndexError(f"index {i} is out of range for an axis of {n}")
