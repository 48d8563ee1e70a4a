// sdlens TokenView front end: the prompt's tokens with their attention share; hover for ids.
// Several text encoders (SD3): one group of chips per encoder, headed by its name (CLIP, T5).
function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "sdl-tokens";
  el.appendChild(root);

  function draw() {
    root.innerHTML = "";
    const head = document.createElement("div");
    head.className = "sdl-title";
    head.textContent = model.get("title");
    root.appendChild(head);
    const row = document.createElement("div");
    row.className = "sdl-token-row";
    const info = document.createElement("div");
    info.className = "sdl-token-info";
    info.textContent = "hover a token for its id";
    const rows = model.get("rows");
    const max = Math.max(1e-12, ...rows.filter((r) => !r.special).map((r) => r.share || 0));
    let encoder = "";
    for (const r of rows) {
      if (r.encoder && r.encoder !== encoder) {  // a new encoder's segment starts here
        encoder = r.encoder;
        const headChip = document.createElement("span");
        headChip.className = "sdl-token-encoder";
        headChip.textContent = `${encoder}:`;
        row.appendChild(headChip);
      }
      const t = document.createElement("span");
      t.className = "sdl-token" + (r.special ? " sdl-token-special" : "") + (r.cut ? " sdl-token-cut" : "");
      t.dataset.position = String(r.position);
      t.textContent = r.text;
      const details = `position ${r.position} · id ${r.id === null ? "?" : r.id} · token '${r.token}'` +
        (r.word ? ` · word '${r.word}'` : "") +
        (r.encoder ? ` · seen by ${r.encoder}` : "") +
        (r.attention === null ? "" : ` · attention ${(100 * r.attention).toFixed(2)}% of all, ${(100 * (r.share || 0)).toFixed(1)}% of the prompt's`) +
        (r.cut ? " · CUT by the 77-token limit" : "");
      t.title = details;
      if (r.attention !== null && !r.special) {
        const bar = document.createElement("span");
        bar.className = "sdl-token-bar";
        bar.style.width = `${Math.round(100 * (r.share || 0) / max)}%`;
        t.appendChild(bar);
        const pct = document.createElement("span");
        pct.className = "sdl-token-share";
        pct.textContent = `${(100 * (r.share || 0)).toFixed(1)}%`;
        t.appendChild(pct);
      }
      t.addEventListener("mouseenter", () => {
        info.textContent = details;
        model.set("hovered", r.position);
        model.save_changes();
      });
      row.appendChild(t);
    }
    root.appendChild(row);
    root.appendChild(info);
    const foot = document.createElement("div");
    foot.className = "sdl-notes";
    foot.textContent = model.get("footer");
    root.appendChild(foot);
  }
  const events = ["change:rows", "change:title", "change:footer"];
  events.forEach((e) => model.on(e, draw));
  draw();
  return () => events.forEach((e) => model.off(e, draw));
}

export default { render };
