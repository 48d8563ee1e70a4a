// sdlens A/B front end (anywidget ESM): the one step slider of two runs, and their difference.
// `step` is linked in the browser to both TraceViewers (ipywidgets jslink): moving this slider,
// or either viewer's, moves all three.

function toUrl(dv) {
  if (!dv || dv.byteLength === 0) return "";
  const type = dv.getUint8(0) === 0x89 ? "image/png" : "image/jpeg";
  return URL.createObjectURL(new Blob([dv], { type }));
}

function h(tag, attrs = {}, children = []) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.appendChild(c);
  return e;
}

function render({ model, el }) {
  let urls = { x0: [], heat: {} };
  let timer = null;
  const root = h("div", { class: "sdl-ab", tabIndex: 0 });
  el.appendChild(root);

  const differs = h("div", { class: "sdl-ab-differs" });
  const summary = h("div", { class: "sdl-ab-note sdl-ab-summary" });
  const playBtn = h("button", { class: "sdl-play", text: "▶ play", title: "play / pause (space)" });
  const prevBtn = h("button", { class: "sdl-prev", text: "◀", title: "previous step (←)" });
  const nextBtn = h("button", { class: "sdl-next", text: "▶", title: "next step (→)" });
  const slider = h("input", { type: "range", class: "sdl-slider sdl-ab-slider", min: 0, step: 1 });
  const stepLabel = h("span", { class: "sdl-step-label" });
  const controls = h("div", { class: "sdl-ab-controls" },
    [h("b", { text: "A and B: " }), playBtn, prevBtn, slider, nextBtn, stepLabel]);

  const px = () => model.get("display_px");
  const x0Img = h("img", { class: "sdl-frame sdl-pixelated", alt: "|x0 A - x0 B|", "data-panel": "x0-diff" });
  const x0Cap = h("div", { class: "sdl-caption" });
  const x0Bar = h("div", { class: "sdl-legend" }, [h("span", { class: "sdl-tick", text: "0" }),
    h("div", { class: "sdl-colorbar sdl-x0-bar" }), h("span", { class: "sdl-tick sdl-x0-max" })]);
  const x0Fig = h("figure", { class: "sdl-panel", "data-panel": "x0-diff" }, [x0Img, x0Cap, x0Bar]);
  const heatImg = h("img", { class: "sdl-frame", alt: "heat A - B", "data-panel": "heat-diff" });
  const heatCap = h("div", { class: "sdl-caption" });
  const heatBar = h("div", { class: "sdl-legend" }, [h("span", { class: "sdl-tick", text: "B" }),
    h("div", { class: "sdl-colorbar sdl-signed-bar" }), h("span", { class: "sdl-tick", text: "A" })]);
  const heatFig = h("figure", { class: "sdl-panel", "data-panel": "heat-diff" }, [heatImg, heatCap, heatBar]);
  const diffRow = h("div", { class: "sdl-ab-diff" }, [x0Fig, heatFig]);
  const notes = h("div", { class: "sdl-notes" });
  const help = h("div", { class: "sdl-help" });
  root.append(differs, controls, diffRow, summary, notes, help);

  function rebuild() {
    urls.x0.forEach((u) => u && URL.revokeObjectURL(u));
    for (const l of [...Object.values(urls.heat), ...Object.values(urls.concepts || {})]) l.forEach((u) => u && URL.revokeObjectURL(u));
    urls = { x0: (model.get("x0_diff") || []).map(toUrl), heat: {}, concepts: {} };
    for (const [k, l] of Object.entries(model.get("heat_diff") || {})) urls.heat[k] = l.map(toUrl);
    for (const [k, l] of Object.entries(model.get("concept_diff") || {})) urls.concepts[k] = l.map(toUrl);
  }

  function drawStatic() {
    const d = model.get("differs") || [];
    differs.innerHTML = "";
    if (d.length) {
      differs.appendChild(h("span", { text: "differ in: " }));
      for (const [name, a, b] of d) {
        differs.appendChild(h("span", { class: "sdl-differs", "data-setting": name, text: `${name}: A ${a} · B ${b}` }));
        differs.appendChild(document.createTextNode(" "));
      }
    } else differs.textContent = "same recorded settings";
    summary.textContent = model.get("summary");
    notes.textContent = (model.get("notes") || []).join(" · ");
    help.textContent = model.get("help");
    slider.max = String(Math.max(0, model.get("n_steps") - 1));
    slider.value = String(model.get("step"));
    for (const img of [x0Img, heatImg]) img.style.width = px() + "px";
    x0Fig.style.width = heatFig.style.width = (px() + 2) + "px";
    root.querySelector(".sdl-x0-bar").style.background = model.get("colorbar");
    root.querySelector(".sdl-signed-bar").style.background = model.get("signed_colorbar");
    root.querySelector(".sdl-x0-max").textContent = Number(model.get("x0_scale")).toPrecision(2);
    x0Fig.style.display = urls.x0.length ? "" : "none";
  }

  function show() {
    const i = Number(slider.value), n = model.get("n_steps"), ts = model.get("timesteps") || [];
    const tb = model.get("timesteps_b") || [];
    // each column's own t: two schedulers put the same step at different noise levels
    const ta = ts.length ? Math.round(ts[i]) : null, tbi = tb.length ? Math.round(tb[i]) : ta;
    stepLabel.textContent = `step ${i + 1}/${n}` + (ta === null ? "" : ta === tbi ? ` · t=${ta}` : ` · t A=${ta} B=${tbi}`);
    if (urls.x0[i]) x0Img.src = urls.x0[i];
    x0Img.dataset.step = String(i);
    x0Cap.textContent = x0Cap.title = model.get("x0_label");
    const w = model.get("word"), maps = model.get("maps");
    const concepts = maps === "concepts";
    const table = concepts ? urls.concepts : maps === "attention" ? urls.heat : {};
    const hm = w && table[w] ? table[w][i] : "";
    heatFig.style.display = Object.keys(urls.heat).length || Object.keys(urls.concepts).length ? "" : "none";
    if (hm) { heatImg.src = hm; heatImg.style.visibility = "visible"; heatImg.style.height = "auto"; }
    else {  // keep the panel's place: the grid does not jump when a word is picked
      heatImg.style.visibility = "hidden";
      heatImg.style.height = (x0Img.height || px()) + "px";
    }
    heatImg.dataset.step = String(i);
    const text = !w ? `heat A − B: click a ${concepts ? "concept" : "word"} in A`
      : table[w] ? (hm ? (concepts ? `'${w}': share A − share B (fixed −1 … 1)`
        : `'${w}': A − B (per step, min–max each)`) : `'${w}': not recorded yet at this step`)
        : concepts ? `'${w}' is not a concept of both runs`
          : maps === "attention" ? `'${w}' is not in both prompts`
            : `no A − B panel for these maps (attention maps and concept maps have one)`;
    heatCap.textContent = heatCap.title = text;
  }

  function setStep(s) {
    s = Math.max(0, Math.min(model.get("n_steps") - 1, s));
    slider.value = String(s);
    show();
    model.set("step", s);
    model.save_changes();
  }

  function stopTimer() { if (timer) clearInterval(timer); timer = null; playBtn.textContent = "▶ play"; }
  function syncPlaying() {
    stopTimer();
    if (!model.get("playing")) return;
    playBtn.textContent = "❚❚ pause";
    if (Number(slider.value) >= model.get("n_steps") - 1) setStep(0);
    timer = setInterval(() => {
      const s = Number(slider.value);
      if (s >= model.get("n_steps") - 1) { model.set("playing", false); model.save_changes(); stopTimer(); return; }
      setStep(s + 1);
    }, 1000 / Math.max(1, model.get("fps")));
  }
  function togglePlay() { model.set("playing", !model.get("playing")); model.save_changes(); syncPlaying(); }

  root.addEventListener("keydown", (ev) => {
    let handled = true;
    if (ev.key === "ArrowLeft") setStep(Number(slider.value) - 1);
    else if (ev.key === "ArrowRight") setStep(Number(slider.value) + 1);
    else if (ev.key === "Home") setStep(0);
    else if (ev.key === "End") setStep(model.get("n_steps") - 1);
    else if (ev.key === " " || ev.code === "Space") togglePlay();
    else handled = false;
    if (handled) ev.preventDefault();
    ev.stopPropagation();
  });
  root.addEventListener("keyup", (ev) => ev.stopPropagation());
  root.addEventListener("keypress", (ev) => ev.stopPropagation());
  slider.addEventListener("input", () => setStep(Number(slider.value)));
  prevBtn.addEventListener("click", () => setStep(Number(slider.value) - 1));
  nextBtn.addEventListener("click", () => setStep(Number(slider.value) + 1));
  playBtn.addEventListener("click", togglePlay);

  const handlers = {
    "change:step": () => { if (Number(slider.value) !== model.get("step")) slider.value = String(model.get("step")); show(); },
    "change:word": show,
    "change:maps": show,
    "change:playing": syncPlaying,
    "change:x0_diff": () => { rebuild(); drawStatic(); show(); },
    "change:heat_diff": () => { rebuild(); show(); },
    "change:differs": drawStatic,
    "change:summary": drawStatic,
    "change:notes": drawStatic,
  };
  for (const [ev, fn] of Object.entries(handlers)) model.on(ev, fn);
  rebuild();
  drawStatic();
  show();
  return () => {
    stopTimer();
    for (const [ev, fn] of Object.entries(handlers)) model.off(ev, fn);
    urls.x0.forEach((u) => u && URL.revokeObjectURL(u));
    for (const l of Object.values(urls.heat)) l.forEach((u) => u && URL.revokeObjectURL(u));
  };
}

export default { render };
