"""Drive the widgets in a real browser: JupyterLab on localhost + Playwright + Chromium.

Used by ``tests/views/test_browser.py`` and ``benchmarks/bench_widgets.py``; handy for debugging a view
too. Needs ``jupyterlab`` and ``playwright`` (the ``dev`` extra) and a Chromium binary
(``apt-get install chromium``: Playwright's own download is not needed).

>>> with JupyterLab(folder) as lab, browser() as b:
...     page = b.new_page()
...     open_and_run(page, lab.url("demo.ipynb"))
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Sequence

REPO = Path(__file__).resolve().parents[1]
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]


def find_chromium() -> str | None:
    """Path of a Chromium binary: ``$SDLENS_CHROMIUM``, the usual Debian paths, or on PATH."""
    env = os.environ.get("SDLENS_CHROMIUM")
    if env and Path(env).exists():
        return env
    for c in CHROMIUM_CANDIDATES:
        if Path(c).exists():
            return c
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_notebook(path: str | os.PathLike, cells: Sequence[str | tuple[str, str]]) -> Path:
    """Write a notebook of code cells (a str) or ``("markdown", text)`` cells."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    for c in cells:
        if isinstance(c, tuple):
            nb.cells.append(nbformat.v4.new_markdown_cell(c[1]))
        else:
            nb.cells.append(nbformat.v4.new_code_cell(c))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = Path(path)
    nbformat.write(nb, path)
    return path


class JupyterLab:
    """A JupyterLab server on 127.0.0.1 (random free port, no token, ``--allow-root``), serving
    ``root`` and stopped on exit. Its kernels import sdlens from this checkout (PYTHONPATH)."""

    def __init__(self, root: str | os.PathLike, port: int | None = None, timeout: float = 90.0,
                 log: str | os.PathLike | None = None):
        self.root = Path(root)
        self.port = port or free_port()
        self.timeout = timeout
        self.log_path = Path(log) if log else None
        self.proc: subprocess.Popen | None = None
        self._tmp = None

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/lab/tree/{path}"

    def __enter__(self) -> "JupyterLab":
        self._tmp = tempfile.TemporaryDirectory(prefix="sdlens-lab-")
        tmp = Path(self._tmp.name)
        settings = tmp / "settings"
        # no news pop-up, no update checks
        (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True)
        (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False}))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.update(JUPYTER_CONFIG_DIR=str(tmp / "config"), JUPYTER_RUNTIME_DIR=str(tmp / "runtime"),
                   JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(tmp / "ws"),
                   PYDEVD_DISABLE_FILE_VALIDATION="1")
        cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={self.port}",
               "--ip=127.0.0.1", "--allow-root", "--ServerApp.open_browser=False",
               "--IdentityProvider.token=", "--ServerApp.password=",
               "--ServerApp.disable_check_xsrf=True", f"--ServerApp.root_dir={self.root}",
               "--ServerApp.quit_button=False"]
        out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=self.root)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited with {self.proc.returncode}"
                                   + (f"; see {self.log_path}" if self.log_path else ""))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/status", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise TimeoutError(f"jupyter lab did not answer on port {self.port} within {self.timeout} s")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


@contextlib.contextmanager
def browser(executable: str | None = None, headless: bool = True) -> Iterator:
    """A Playwright Chromium browser (the system's Chromium). RuntimeError without one."""
    from playwright.sync_api import sync_playwright

    exe = executable or find_chromium()
    if exe is None:
        raise RuntimeError("no Chromium found (install it: apt-get install chromium; or set "
                           "SDLENS_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=headless, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def open_and_run(page, url: str, wait_for: str = ".sdl-viewer .sdl-frame", timeout: float = 240.0) -> None:
    """Open a notebook in JupyterLab, run all its cells (Run > Run All Cells) and wait until
    ``wait_for`` (a CSS selector) is visible in an output."""
    ms = int(timeout * 1000)
    page.goto(url, timeout=ms)
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=ms)
    accept_dialogs(page, settle=3.0)
    # the kernel must be up before running
    page.wait_for_function(
        "() => [...document.querySelectorAll('.jp-StatusBar-TextItem')]"
        ".some(e => /\\|\\s*Idle/.test(e.textContent))", timeout=ms)
    accept_dialogs(page, settle=0.5)
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    page.wait_for_selector(wait_for, state="visible", timeout=ms)


def accept_dialogs(page, settle: float = 1.0) -> int:
    """Accept JupyterLab dialogs (e.g. "Select Kernel") that show up within ``settle`` seconds."""
    n = 0
    deadline = time.time() + settle
    while time.time() < deadline:
        btn = page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-accept")
        if btn.count():
            btn.first.click()
            n += 1
            deadline = time.time() + settle
        page.wait_for_timeout(200)
    return n
