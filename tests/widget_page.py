"""The widgets' front ends in a bare Chromium page, each synced with its kernel widget.

No JupyterLab, no kernel process: each anywidget's ESM (``_esm``) renders into a ``<div>`` with
a stand-in model whose ``save_changes()`` sends the changed values to the Python widget (through
Playwright's ``expose_function``); what the widget's observers change in answer comes back and
fires the front end's ``change:`` handlers, as ipywidgets does. ``links``: the ipywidgets
``jslink`` / ``jsdlink`` objects between them, played in the page as the browser plays them.
A test renders in a second or two (``tests/browser.py`` drives a real JupyterLab instead).

>>> with chromium_page() as page:
...     wp = WidgetPage(page, {"v": viewer})
...     page.locator(".sdl-chip[data-word='circle']").click(); wp.settle()
"""

from __future__ import annotations

import base64
import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

_JS = r"""
window.__models = {}; window.__render = window.__render || {}; window.__pending = 0;
window.__errors = [];
function revive(x) {  // {"__b64": ...} -> DataView, as anywidget hands over binary buffers
  if (Array.isArray(x)) return x.map(revive);
  if (x && typeof x === "object") {
    if ("__b64" in x) {
      const s = atob(x.__b64), a = new Uint8Array(s.length);
      for (let i = 0; i < s.length; i++) a[i] = s.charCodeAt(i);
      return new DataView(a.buffer);
    }
    return Object.fromEntries(Object.entries(x).map(([k, v]) => [k, revive(v)]));
  }
  return x;
}
window.__applyAll = (all) => {
  for (const [name, state] of Object.entries(all)) window.__models[name].apply(state);
};
class SyncModel {
  constructor(name, state) { this.name = name; this.s = revive(state); this.h = {}; this.dirty = new Set(); }
  get(k) { return this.s[k]; }
  set(k, v) { this.s[k] = v; this.dirty.add(k); this.fire(k); }
  fire(k) { (this.h["change:" + k] || []).slice().forEach((f) => f()); }
  apply(state) { for (const [k, v] of Object.entries(revive(state))) { this.s[k] = v; this.fire(k); } }
  save_changes() {
    const ch = {};
    for (const k of this.dirty) ch[k] = this.s[k];
    this.dirty.clear();
    if (!Object.keys(ch).length) return;
    window.__pending++;
    window.__kernel(this.name, JSON.stringify(ch)).then((r) => {
      window.__applyAll(JSON.parse(r));
      window.__pending--;
    });
  }
  on(ev, fn) { (this.h[ev] = this.h[ev] || []).push(fn); }
  off(ev, fn) { this.h[ev] = (this.h[ev] || []).filter((f) => f !== fn); }
}
window.__link = (src, sattr, dst, dattr) => {  // ipywidgets' jslink, one direction
  const a = window.__models[src], b = window.__models[dst];
  a.on("change:" + sattr, () => {
    if (b.get(dattr) !== a.get(sattr)) { b.set(dattr, a.get(sattr)); b.save_changes(); }
  });
};
window.__make = (name, state) => { window.__models[name] = new SyncModel(name, state); };
"""

SKIP = {"layout", "tabbable", "tooltip", "comm", "keys", "log", "_esm", "_css",
        "_model_module", "_model_module_version", "_model_name", "_view_module",
        "_view_module_version", "_view_name", "_view_count", "_dom_classes", "_anywidget_id"}


def _enc(x: Any) -> Any:
    if isinstance(x, (bytes, bytearray, memoryview)):
        return {"__b64": base64.b64encode(bytes(x)).decode("ascii")}
    if isinstance(x, dict):
        return {k: _enc(y) for k, y in x.items()}
    if isinstance(x, (list, tuple)):
        return [_enc(y) for y in x]
    return x


def _text(x: Any) -> str:
    """An anywidget's ``_esm`` / ``_css``: the text, or a path to it."""
    if isinstance(x, Path) or (isinstance(x, str) and "\n" not in x and Path(x).is_file()):
        return Path(x).read_text()
    return str(x)


def _names(w: Any) -> list[str]:
    return [n for n in w.trait_names(sync=True) if n not in SKIP and not n.startswith("_")]


class WidgetPage:
    """Render ``widgets`` (``{name: anywidget}``) into ``page``, in that order, each in
    ``<div id=name>`` (the page's own when ``html`` has one; or the element ``containers[name]``
    selects), with the
    stand-in model synced with the Python widget. ``links``: ipywidgets Link /
    DirectionalLink objects between these widgets. ``html``: the page's body before rendering.
    ``errors``: what the kernel side raised on a value the page sent (ipywidgets would log it)."""

    def __init__(self, page: Any, widgets: dict[str, Any], links: Any = (), html: str = "",
                 containers: dict[str, str] | None = None):
        self.page, self.widgets = page, dict(widgets)
        self.errors: list[str] = []
        self._pending: dict[str, dict] = {}
        self._quiet: dict[str, dict] = {}
        page.on("pageerror", lambda e: self.errors.append(f"page: {e}"))
        page.set_content("<html><body>" + html + "</body></html>")
        css = {_text(w._css) for w in self.widgets.values() if getattr(w, "_css", None)}
        for c in css:
            page.add_style_tag(content=c)
        page.expose_function("__kernel", self._from_page)
        page.add_script_tag(content=_JS)
        for kind, w in {type(w).__name__: w for w in self.widgets.values()}.items():
            js = _text(w._esm).replace("export default { render };",
                                       f"window.__render[{json.dumps(kind)}] = render;")
            page.add_script_tag(content=js, type="module")
            page.wait_for_function(f"() => !!window.__render[{json.dumps(kind)}]")
        for name, w in self.widgets.items():
            page.evaluate("([n, s]) => window.__make(n, s)",
                          [name, _enc({k: getattr(w, k) for k in _names(w)})])
            w.observe(lambda ch, name=name: self._kernel_change(name, ch), names=_names(w))
        ident = {id(w): n for n, w in self.widgets.items()}
        for link in links:
            (sw, sa), (tw, ta) = link.source, link.target
            s, t = ident[id(sw)], ident[id(tw)]
            page.evaluate("(a) => window.__link(...a)", [s, sa, t, ta])
            if type(link).__name__ == "Link":  # jslink: both ways (jsdlink: DirectionalLink)
                page.evaluate("(a) => window.__link(...a)", [t, ta, s, sa])
        for name, w in self.widgets.items():
            sel = (containers or {}).get(name)
            page.evaluate(
                "([n, file, sel]) => { let el = document.querySelector(sel || ('#' + n));"
                " if (!el) { el = document.createElement('div'); el.id = n;"
                " document.body.appendChild(el); }"
                " window.__render[file]({ model: window.__models[n], el }); }",
                [name, type(w).__name__, sel])

    # ---------------------------------------------------------------- the wire
    def _kernel_change(self, name: str, change: dict) -> None:
        sent = self._quiet.get(name, {})
        if change["name"] in sent and sent[change["name"]] == change["new"]:
            return  # the page's own value: ipywidgets does not echo it back to its sender
        self._pending.setdefault(name, {})[change["name"]] = change["new"]

    def _from_page(self, name: str, changes: str) -> str:
        w = self.widgets[name]
        values = json.loads(changes)
        self._quiet[name] = values
        try:
            for k, v in values.items():
                try:
                    setattr(w, k, v)
                except Exception as e:  # noqa: BLE001 - the kernel's answer to a bad value
                    self.errors.append(f"kernel {name}.{k}={v!r}: {type(e).__name__}: {e}")
        finally:
            self._quiet.pop(name, None)
        return self._take()

    def _take(self) -> str:
        out = {n: _enc(ch) for n, ch in self._pending.items()}
        self._pending = {}
        return json.dumps(out)

    def settle(self, timeout_ms: int = 10_000) -> None:
        """Wait until the page's messages are answered, then send the kernel's own changes."""
        for _ in range(5):
            self.page.wait_for_function("() => window.__pending === 0", timeout=timeout_ms)
            if not self._pending:
                return
            self.page.evaluate("(s) => window.__applyAll(JSON.parse(s))", self._take())


@contextlib.contextmanager
def chromium_page(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A Playwright page in the system's Chromium (pytest skips without one)."""
    import pytest

    pytest.importorskip("playwright.sync_api")
    from browser import browser, find_chromium

    if find_chromium() is None:
        pytest.skip("no Chromium binary (apt-get install chromium, or set SDLENS_CHROMIUM)")
    with browser() as b:
        page = b.new_page(viewport={"width": width, "height": height})
        yield page
