// sdlens TraceViewer front end (anywidget ESM).
// Frames arrive once as binary buffers (DataView); they become Blob URLs here and scrubbing only
// swaps <img> sources: no kernel round trip per frame.

function mimeOf(dv) {
  return dv.byteLength > 0 && dv.getUint8(0) === 0x89 ? "image/png" : "image/jpeg";
}

function toUrl(dv) {
  if (!dv || dv.byteLength === 0) return "";
  return URL.createObjectURL(new Blob([dv], { type: mimeOf(dv) }));
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
  const urls = { frames: {}, image: "", heat: {} };
  let timer = null;

  const root = h("div", { class: "sdl-viewer" });
  el.appendChild(root);

  const title = h("div", { class: "sdl-title" });
  const notes = h("div", { class: "sdl-notes" });

  const playBtn = h("button", { class: "sdl-play", text: "▶ play", title: "play / pause" });
  const prevBtn = h("button", { class: "sdl-prev", text: "◀", title: "previous step" });
  const nextBtn = h("button", { class: "sdl-next", text: "▶", title: "next step" });
  const slider = h("input", { type: "range", class: "sdl-slider", min: 0, step: 1 });
  const stepLabel = h("span", { class: "sdl-step-label" });
  const controls = h("div", { class: "sdl-controls" }, [playBtn, prevBtn, slider, nextBtn, stepLabel]);

  const panelRow = h("div", { class: "sdl-panels" });
  const chipRow = h("div", { class: "sdl-chips" });
  const modeSel = h("select", { class: "sdl-mode", title: "heatmap at the current step or summed over steps" });
  modeSel.appendChild(h("option", { value: "step", text: "heatmap at this step" }));
  modeSel.appendChild(h("option", { value: "sum", text: "heatmap summed over steps" }));
  const layerSel = h("select", { class: "sdl-layers", title: "attention layers / resolution" });
  const batchSel = h("select", { class: "sdl-batch", title: "batch item" });
  const opacity = h("input", { type: "range", class: "sdl-opacity", min: 0, max: 1, step: 0.05, title: "overlay opacity" });
  const options = h("div", { class: "sdl-options" }, [
    h("label", { text: "layers " }, [layerSel]),
    h("label", { text: " mode " }, [modeSel]),
    h("label", { text: " opacity " }, [opacity]),
    h("label", { class: "sdl-batch-label", text: " image " }, [batchSel]),
  ]);
  const status = h("span", { class: "sdl-status" });
  root.append(title, controls, panelRow, chipRow, options, notes, status);

  // panels: name -> {img, overlay}
  let panelEls = {};

  function buildPanels() {
    panelRow.innerHTML = "";
    panelEls = {};
    const px = model.get("display_px");
    const specs = [...model.get("panels"), { name: "image", label: "output image" }];
    for (const spec of specs) {
      const img = h("img", { class: "sdl-frame", alt: spec.label, "data-panel": spec.name });
      img.style.width = px + "px";
      img.style.height = "auto";
      if (spec.name === "noise" || spec.name === "cfg_delta") img.classList.add("sdl-pixelated");
      const stack = h("div", { class: "sdl-stack" }, [img]);
      let overlay = null;
      if (spec.name === "x0" || spec.name === "image") {
        overlay = h("img", { class: "sdl-overlay", alt: "heatmap", "data-panel": spec.name + "-overlay" });
        overlay.style.width = px + "px";
        overlay.style.height = "auto";
        stack.appendChild(overlay);
      }
      const caption = h("div", { class: "sdl-caption", text: spec.label });
      panelRow.appendChild(h("figure", { class: "sdl-panel", "data-panel": spec.name }, [stack, caption]));
      panelEls[spec.name] = { img, overlay, caption, label: spec.label };
    }
  }

  function rebuildFrameUrls() {
    for (const list of Object.values(urls.frames)) list.forEach((u) => u && URL.revokeObjectURL(u));
    urls.frames = {};
    const frames = model.get("frames") || {};
    for (const [name, list] of Object.entries(frames)) urls.frames[name] = list.map(toUrl);
    if (urls.image) URL.revokeObjectURL(urls.image);
    urls.image = toUrl(model.get("image"));
  }

  function rebuildHeatUrls() {
    for (const hm of Object.values(urls.heat)) {
      hm.steps.forEach((u) => u && URL.revokeObjectURL(u));
      if (hm.sum) URL.revokeObjectURL(hm.sum);
    }
    urls.heat = {};
    const heat = model.get("heat") || {};
    for (const [key, hm] of Object.entries(heat)) {
      urls.heat[key] = { steps: hm.steps.map(toUrl), sum: toUrl(hm.sum) };
    }
  }

  function buildChips() {
    chipRow.innerHTML = "";
    const words = model.get("words") || [];
    if (!words.length) return;
    chipRow.appendChild(h("span", { class: "sdl-chips-label", text: "words: " }));
    for (const w of words) {
      const chip = h("button", {
        class: "sdl-chip", text: w.text, "data-word": w.key,
        title: `tokens ${w.tokens.join(" ")} at positions ${w.positions.join(", ")}`,
      });
      chip.addEventListener("click", () => {
        const next = model.get("word") === w.key ? "" : w.key;
        model.set("word", next);
        model.save_changes();
        show();
      });
      chipRow.appendChild(chip);
    }
  }

  function fillSelect(sel, opts, value) {
    sel.innerHTML = "";
    for (const [k, label] of opts) sel.appendChild(h("option", { value: String(k), text: label }));
    sel.value = String(value);
  }

  function currentStep() {
    return Number(slider.value);
  }

  function show() {
    const step = currentStep();
    const n = model.get("n_steps");
    for (const [name, p] of Object.entries(panelEls)) {
      const src = name === "image" ? urls.image : (urls.frames[name] || [])[step];
      if (src && p.img.src !== src) p.img.src = src;
      p.img.dataset.step = name === "image" ? "final" : String(step);
    }
    const ts = model.get("timesteps") || [];
    stepLabel.textContent = `step ${step + 1}/${n}` + (ts.length ? ` · t=${Math.round(ts[step])}` : "");
    // overlay
    const word = model.get("word");
    const mode = model.get("heat_mode");
    let src = "";
    if (word && urls.heat[word]) {
      if (mode === "sum") src = urls.heat[word].sum;
      else {
        const i = (model.get("heat_index") || [])[step];
        src = i !== undefined && i >= 0 ? urls.heat[word].steps[i] : "";
      }
    }
    for (const [name, p] of Object.entries(panelEls)) {
      if (!p.overlay) continue;
      if (src) {
        if (p.overlay.src !== src) p.overlay.src = src;
        p.overlay.style.display = "block";
        p.caption.textContent = `${p.label} + '${word}' (${mode === "sum" ? "summed" : "this step"})`;
      } else {
        p.overlay.removeAttribute("src");
        p.overlay.style.display = "none";
        p.caption.textContent = p.label;
      }
      p.overlay.style.opacity = model.get("opacity");
    }
    for (const chip of chipRow.querySelectorAll(".sdl-chip")) {
      chip.classList.toggle("sdl-chip-on", chip.dataset.word === word);
    }
  }

  function saveStep(step) {
    // the view switched already; tell the kernel (ipywidgets drops the echoes of older values)
    model.set("step", step);
    model.save_changes();
  }

  function setStep(step) {
    const n = model.get("n_steps");
    step = Math.max(0, Math.min(n - 1, step));
    slider.value = String(step);
    show();
    saveStep(step);
  }

  function stopTimer() {
    if (timer) clearInterval(timer);
    timer = null;
    playBtn.textContent = "▶ play";
  }

  function syncPlaying() {
    stopTimer();
    if (!model.get("playing")) return;
    playBtn.textContent = "❚❚ pause";
    const n = model.get("n_steps");
    if (currentStep() >= n - 1) setStep(0);
    timer = setInterval(() => {
      const s = currentStep();
      if (s >= model.get("n_steps") - 1) {
        model.set("playing", false);
        model.save_changes();
        stopTimer();
        return;
      }
      setStep(s + 1);
    }, 1000 / Math.max(1, model.get("fps")));
  }

  function fullRefresh() {
    title.textContent = model.get("title");
    notes.textContent = (model.get("notes") || []).join(" · ");
    slider.max = String(Math.max(0, model.get("n_steps") - 1));
    slider.value = String(model.get("step"));
    modeSel.value = model.get("heat_mode");
    opacity.value = String(model.get("opacity"));
    fillSelect(layerSel, model.get("layer_options") || [], model.get("layers"));
    layerSel.parentElement.style.display = (model.get("layer_options") || []).length ? "" : "none";
    fillSelect(batchSel, model.get("batch_options") || [], model.get("batch"));
    batchSel.parentElement.style.display = (model.get("batch_options") || []).length > 1 ? "" : "none";
    buildPanels();
    rebuildFrameUrls();
    rebuildHeatUrls();
    buildChips();
    show();
  }

  // ---- events from the user
  slider.addEventListener("input", () => {
    show();
    saveStep(currentStep());
  });
  prevBtn.addEventListener("click", () => setStep(currentStep() - 1));
  nextBtn.addEventListener("click", () => setStep(currentStep() + 1));
  playBtn.addEventListener("click", () => {
    model.set("playing", !model.get("playing"));
    model.save_changes();
    syncPlaying();
  });
  modeSel.addEventListener("change", () => {
    model.set("heat_mode", modeSel.value);
    model.save_changes();
    show();
  });
  opacity.addEventListener("input", () => {
    model.set("opacity", Number(opacity.value));
    model.save_changes();
    show();
  });
  layerSel.addEventListener("change", () => {
    status.textContent = "loading heatmaps…";
    model.set("layers", layerSel.value);
    model.save_changes();
  });
  batchSel.addEventListener("change", () => {
    status.textContent = "loading frames…";
    model.set("batch", Number(batchSel.value));
    model.save_changes();
  });

  // ---- changes from the kernel
  const handlers = {
    "change:frames": () => { rebuildFrameUrls(); show(); },
    "change:image": () => { rebuildFrameUrls(); show(); },
    "change:heat": () => { rebuildHeatUrls(); show(); status.textContent = ""; },
    "change:words": () => { buildChips(); show(); },
    "change:panels": () => { buildPanels(); show(); },
    "change:title": () => { title.textContent = model.get("title"); status.textContent = ""; },
    "change:step": () => {
      if (Number(slider.value) !== model.get("step")) { slider.value = String(model.get("step")); show(); }
    },
    "change:word": () => show(),
    "change:heat_mode": () => { modeSel.value = model.get("heat_mode"); show(); },
    "change:opacity": () => { opacity.value = String(model.get("opacity")); show(); },
    "change:heat_index": () => show(),
    "change:playing": () => syncPlaying(),
    "change:fps": () => syncPlaying(),
    "change:layers": () => { layerSel.value = model.get("layers"); },
    "change:batch": () => { batchSel.value = String(model.get("batch")); },
    "change:layer_options": () => fillSelect(layerSel, model.get("layer_options") || [], model.get("layers")),
    "change:notes": () => { notes.textContent = (model.get("notes") || []).join(" · "); },
    "change:n_steps": () => { slider.max = String(Math.max(0, model.get("n_steps") - 1)); show(); },
  };
  for (const [ev, fn] of Object.entries(handlers)) model.on(ev, fn);

  fullRefresh();
  syncPlaying();

  return () => {
    stopTimer();
    for (const [ev, fn] of Object.entries(handlers)) model.off(ev, fn);
    for (const list of Object.values(urls.frames)) list.forEach((u) => u && URL.revokeObjectURL(u));
    for (const hm of Object.values(urls.heat)) {
      hm.steps.forEach((u) => u && URL.revokeObjectURL(u));
      if (hm.sum) URL.revokeObjectURL(hm.sum);
    }
    if (urls.image) URL.revokeObjectURL(urls.image);
  };
}

export default { render };
