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

// Heat frames are RGBA: colour from the colormap, alpha = sqrt(value) * max_alpha. Reading the
// alpha back gives the value under the pointer and the outline (contour) mode.
const pixelCache = new Map(); // blob url -> {w, h, data}

function pixelsOf(url) {
  return new Promise((resolve) => {
    if (!url) return resolve(null);
    if (pixelCache.has(url)) return resolve(pixelCache.get(url));
    const img = new Image();
    img.onload = () => {
      const c = document.createElement("canvas");
      c.width = img.naturalWidth;
      c.height = img.naturalHeight;
      const ctx = c.getContext("2d");
      ctx.drawImage(img, 0, 0);
      const px = { w: c.width, h: c.height, data: ctx.getImageData(0, 0, c.width, c.height).data };
      if (pixelCache.size > 256) pixelCache.clear();
      pixelCache.set(url, px);
      resolve(px);
    };
    img.onerror = () => resolve(null);
    img.src = url;
  });
}

const LEVELS = [0.25, 0.5, 0.75];

function drawOutline(canvas, px, maxAlpha, byColour) {
  // contour lines at LEVELS: a pixel is on a line where its level band differs from a neighbour's
  // (byColour: the winner view, a line where the winning concept changes)
  canvas.width = px.w;
  canvas.height = px.h;
  const ctx = canvas.getContext("2d");
  const out = ctx.createImageData(px.w, px.h);
  const band = new Uint32Array(px.w * px.h);
  for (let i = 0; i < px.w * px.h; i++) {
    if (byColour) {
      band[i] = (px.data[4 * i] << 16) | (px.data[4 * i + 1] << 8) | px.data[4 * i + 2];
      continue;
    }
    const a = px.data[4 * i + 3] / 255 / maxAlpha;
    const v = a * a;
    let b = 0;
    for (const l of LEVELS) if (v >= l) b++;
    band[i] = b;
  }
  for (let y = 0; y < px.h; y++) {
    for (let x = 0; x < px.w; x++) {
      const i = y * px.w + x;
      const r = x + 1 < px.w ? band[i + 1] : band[i];
      const d = y + 1 < px.h ? band[i + px.w] : band[i];
      if (band[i] !== r || band[i] !== d) {
        out.data[4 * i] = px.data[4 * i];
        out.data[4 * i + 1] = px.data[4 * i + 1];
        out.data[4 * i + 2] = px.data[4 * i + 2];
        out.data[4 * i + 3] = 255;
      }
    }
  }
  ctx.putImageData(out, 0, 0);
}

function render({ model, el }) {
  const urls = { frames: {}, image: "", heat: {} };
  let timer = null;

  // tabindex: the panel takes the keyboard focus when clicked, so its keys stay in it
  const root = h("div", { class: "sdl-viewer", tabIndex: 0 });
  el.appendChild(root);

  const title = h("div", { class: "sdl-title" });
  const notes = h("div", { class: "sdl-notes" });

  const playBtn = h("button", { class: "sdl-play", text: "▶ play", title: "play / pause" });
  const prevBtn = h("button", { class: "sdl-prev", text: "◀", title: "previous step" });
  const nextBtn = h("button", { class: "sdl-next", text: "▶", title: "next step" });
  const slider = h("input", { type: "range", class: "sdl-slider", min: 0, step: 1 });
  const stepLabel = h("span", { class: "sdl-step-label" });
  // a video trace's latent frame (hidden for images): beside the step slider, ↑/↓ too
  const frameSlider = h("input", { type: "range", class: "sdl-frame-slider", min: 0, step: 1, title: "latent frame" });
  const frameLabel = h("span", { class: "sdl-frame-label" });
  const frameBox = h("span", { class: "sdl-frame-box" }, [frameSlider, frameLabel]);
  const controls = h("div", { class: "sdl-controls" }, [playBtn, prevBtn, slider, nextBtn, stepLabel, frameBox]);

  const panelRow = h("div", { class: "sdl-panels" });
  const chipRow = h("div", { class: "sdl-chips" });
  const modeSel = h("select", { class: "sdl-mode", title: "heatmap at the current step or summed over steps" });
  modeSel.appendChild(h("option", { value: "step", text: "heatmap at this step" }));
  modeSel.appendChild(h("option", { value: "sum", text: "heatmap summed over steps" }));
  const layerSel = h("select", { class: "sdl-layers", title: "attention layers / resolution" });
  // which recorded maps the chips overlay: attention, concept maps, image->text maps
  const mapsSel = h("select", { class: "sdl-maps", title: "raw attention maps, or the concept maps / image→text maps the trace recorded" });
  const batchSel = h("select", { class: "sdl-batch", title: "batch item" });
  const opacity = h("input", { type: "range", class: "sdl-opacity", min: 0, max: 1, step: 0.05, title: "overlay opacity" });
  const styleSel = h("select", { class: "sdl-style", title: "heatmap as a filled overlay or as contour lines" });
  styleSel.appendChild(h("option", { value: "fill", text: "filled" }));
  styleSel.appendChild(h("option", { value: "outline", text: "outline (contours 0.25 / 0.5 / 0.75)" }));
  // the image in grey under a filled heat (hue is the heat's alone), or in colour
  const greyBox = h("input", { type: "checkbox", class: "sdl-grey", title: "show the image in grey (its luminance) under a filled heatmap, so a red map on a red object still reads" });
  const decoderSel = h("select", { class: "sdl-decoder", title: "how x_t and x0 are turned into pixels" });
  // concept maps: their share among the concepts (fixed 0-1) or stretched min-max
  const scaleSel = h("select", { class: "sdl-scale", title: "how a concept map is coloured: its share among the concepts on a fixed 0–1 scale, or each map stretched min–max" });
  const options = h("div", { class: "sdl-options" }, [
    h("label", { class: "sdl-maps-label", text: "maps " }, [mapsSel]),
    h("label", { class: "sdl-scale-label", text: " scale " }, [scaleSel]),
    h("label", { text: " layers " }, [layerSel]),
    h("label", { text: " mode " }, [modeSel]),
    h("label", { text: " overlay " }, [styleSel]),
    h("label", { text: " opacity " }, [opacity]),
    h("label", { text: " grey image " }, [greyBox]),
    h("label", { class: "sdl-decoder-label", text: " x_t / x0 " }, [decoderSel]),
    h("label", { class: "sdl-batch-label", text: " image " }, [batchSel]),
  ]);
  // the heat legend: colour bar 0..1, how the maps are normalised, the value under the pointer
  const colorbar = h("div", { class: "sdl-colorbar", title: "heat colour scale, 0 (left) to 1 (right)" });
  const legendText = h("span", { class: "sdl-legend-text" });
  const valueText = h("span", { class: "sdl-value" });
  // the winner view's legend: one swatch per concept instead of the colour bar
  const swatches = h("span", { class: "sdl-swatches" });
  const bar = h("span", { class: "sdl-bar" }, [
    h("span", { class: "sdl-tick", text: "0" }), colorbar, h("span", { class: "sdl-tick", text: "1" })]);
  const legend = h("div", { class: "sdl-legend" }, [bar, swatches, legendText, valueText]);
  const help = h("div", { class: "sdl-help" });
  const status = h("span", { class: "sdl-status" });
  root.append(title, controls, panelRow, legend, chipRow, options, notes, help, status);

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
      let overlay = null, outline = null;
      if (spec.name === "x0" || spec.name === "image") {
        overlay = h("img", { class: "sdl-overlay", alt: "heatmap", "data-panel": spec.name + "-overlay" });
        overlay.style.width = px + "px";
        overlay.style.height = "auto";
        outline = h("canvas", { class: "sdl-outline", "data-panel": spec.name + "-outline" });
        outline.style.width = px + "px";
        stack.append(overlay, outline);
        stack.addEventListener("mousemove", (ev) => pointAt(ev, stack));
        stack.addEventListener("mouseleave", () => { valueText.textContent = ""; });
      }
      const caption = h("div", { class: "sdl-caption", text: spec.label, title: spec.label });
      caption.dataset.panel = spec.name;
      const fig = h("figure", { class: "sdl-panel", "data-panel": spec.name }, [stack, caption]);
      fig.style.width = (px + 2) + "px";  // fixed: a longer caption wraps, the grid does not move
      panelRow.appendChild(fig);
      panelEls[spec.name] = { img, overlay, outline, caption, label: spec.label };
    }
  }

  let overlayUrl = "";

  function wordInfo(key) {
    return (model.get("words") || []).find((w) => w.key === key) || null;
  }

  async function pointAt(ev, stack) {
    if (!overlayUrl) { valueText.textContent = ""; return; }
    const r = stack.getBoundingClientRect();
    const fx = (ev.clientX - r.left) / r.width, fy = (ev.clientY - r.top) / r.height;
    const px = await pixelsOf(overlayUrl);
    if (!px || fx < 0 || fy < 0 || fx >= 1 || fy >= 1) return;
    const x = Math.floor(fx * px.w), y = Math.floor(fy * px.h);
    const i = 4 * (y * px.w + x);
    const info = wordInfo(model.get("word"));
    if (info && info.winner) {  // the concept whose colour this is
      const hex = "#" + [0, 1, 2].map((k) => px.data[i + k].toString(16).padStart(2, "0")).join("");
      const hit = (info.colors || []).find(([, c]) => c.toLowerCase() === hex);
      valueText.textContent = hit ? `wins here: '${hit[0]}'` : "";
      return;
    }
    const a = px.data[i + 3] / 255 / model.get("max_alpha");
    const share = model.get("maps") === "concepts" && model.get("concept_scale") === "share";
    valueText.textContent = `${share ? "share" : "value"} here: ${(a * a).toFixed(2)}`;
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
      urls.heat[key] = { steps: hm.steps.map(toUrl), sum: toUrl(hm.sum),
                         sumFrames: hm.sum_frames ? hm.sum_frames.map(toUrl) : null };
    }
  }

  function buildChips() {
    chipRow.innerHTML = "";
    const words = model.get("words") || [];
    if (!words.length) return;
    const concepts = model.get("maps") === "concepts";
    chipRow.appendChild(h("span", { class: "sdl-chips-label", text: concepts ? "concepts: " : "words: " }));
    const share = model.get("concept_scale") === "share";
    for (const w of words) {
      const chip = h("button", {
        // the chip reads the word's name ("a", "a#2"): the name the kernel, plots and
        // token_effects use for it
        class: "sdl-chip" + (w.winner ? " sdl-chip-winner" : ""), text: w.winner ? w.text : w.key,
        "data-word": w.key,
        title: w.winner ? "each pixel coloured by the concept with the largest share there" :
          concepts ? (share ? `concept '${w.key}': its share of each patch among the concepts (0–1)` :
            `concept '${w.key}': its map stretched min–max (not its share)`) :
          `tokens ${w.tokens.join(" ")} at positions ${w.positions.join(", ")}` +
          (w.encoders && w.encoders.length ? ` · seen by ${w.encoders.join(" and ")}` : ""),
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

  function fillMaps() {
    fillSelect(mapsSel, model.get("maps_options") || [], model.get("maps"));
    mapsSel.parentElement.style.display = (model.get("maps_options") || []).length > 1 ? "" : "none";
    fillSelect(scaleSel, model.get("concept_scale_options") || [], model.get("concept_scale"));
    scaleSel.parentElement.style.display = model.get("maps") === "concepts" ? "" : "none";
  }

  function setCaption(p, text) {
    p.caption.textContent = text;
    p.caption.title = text;  // the whole caption on hover, whatever the panel's width
  }

  function currentStep() {
    return Number(slider.value);
  }

  function currentFrame() {
    return model.get("n_frames") > 1 ? Number(frameSlider.value) : 0;
  }

  // a video trace's frames are step-major: entry step * n_frames + frame
  function at(step) {
    return step * Math.max(1, model.get("n_frames")) + currentFrame();
  }

  function show() {
    const step = currentStep();
    const n = model.get("n_steps");
    legendText.textContent = "";
    for (const [name, p] of Object.entries(panelEls)) {
      const src = name === "image" ? urls.image : (urls.frames[name] || [])[at(step)];
      if (src && p.img.src !== src) p.img.src = src;
      p.img.dataset.step = name === "image" ? "final" : String(step);
      p.img.dataset.frame = String(currentFrame());
    }
    const ts = model.get("timesteps") || [];
    stepLabel.textContent = `step ${step + 1}/${n}` + (ts.length ? ` · t=${Math.round(ts[step])}` : "");
    const nf = model.get("n_frames");
    frameBox.style.display = nf > 1 ? "" : "none";
    frameLabel.textContent = nf > 1 ? `frame ${currentFrame() + 1}/${nf}` : "";
    // overlay
    const word = model.get("word");
    const mode = model.get("heat_mode");
    const info = wordInfo(word);
    const winner = !!(info && info.winner);
    let src = "";
    if (word && urls.heat[word]) {
      const hm = urls.heat[word];
      if (mode === "sum") src = hm.sumFrames ? hm.sumFrames[currentFrame()] : hm.sum;
      else {
        const i = (model.get("heat_index") || [])[step];
        src = i !== undefined && i >= 0 ? hm.steps[at(i)] : "";
      }
    }
    const outlined = model.get("overlay_style") === "outline";
    const grey = !!(src && !outlined && model.get("grey"));
    overlayUrl = src;
    for (const [name, p] of Object.entries(panelEls)) {
      if (!p.overlay) continue;
      if (src) {
        if (p.overlay.src !== src) p.overlay.src = src;
        p.overlay.style.display = outlined ? "none" : "block";
        p.outline.style.display = outlined ? "block" : "none";
        const what = winner ? "winning concept" : `'${word}'`;
        setCaption(p, `${p.label} + ${what} (${mode === "sum" ? "summed" : "this step"})`);
      } else {
        p.overlay.removeAttribute("src");
        p.overlay.style.display = "none";
        p.outline.style.display = "none";
        setCaption(p, p.label);
      }
      p.overlay.style.opacity = model.get("opacity");
      p.img.style.filter = grey ? "grayscale(1)" : "";  // CSS's Rec. 709 luminance
    }
    if (src && outlined) {
      pixelsOf(src).then((px) => {
        if (!px || overlayUrl !== src) return;
        for (const p of Object.values(panelEls)) if (p.outline) drawOutline(p.outline, px, model.get("max_alpha"), winner);
      });
    }
    const norms = model.get("heat_norms") || {};
    const concepts = model.get("maps") === "concepts";
    const scale = norms[mode] || mode;
    swatches.innerHTML = "";
    bar.style.display = winner ? "none" : "";
    if (!(model.get("words") || []).length) legendText.textContent = "no word heatmaps (see the note below)";
    else if (winner) {
      for (const [c, col] of info.colors || []) {
        const sw = h("span", { class: "sdl-swatch", "data-concept": c, title: `'${c}' has the largest share here` },
          [h("span", { class: "sdl-swatch-box" }), document.createTextNode(c)]);
        sw.firstChild.style.background = col;
        swatches.appendChild(sw);
      }
      legendText.textContent = `winning concept per pixel (largest share, ${mode === "sum" ? "mean over steps" : "this step"})`;
    } else if (word && src) legendText.textContent = `'${word}': ${scale}`;
    else if (word) legendText.textContent = `'${word}': no map ${info ? "at this step" : "in these " + (concepts ? "concepts" : "words")}`;
    else legendText.textContent = `click a ${concepts ? "concept" : "word"} to overlay its heatmap (${scale})`;
    if (grey) legendText.textContent += ` · ${model.get("grey_note")}`;
    legend.classList.toggle("sdl-legend-off", !src);
    valueText.textContent = src ? valueText.textContent : "";
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

  function setFrame(frame) {
    const nf = model.get("n_frames");
    if (nf <= 1) return;
    frame = Math.max(0, Math.min(nf - 1, frame));
    frameSlider.value = String(frame);
    show();
    model.set("frame", frame);
    model.save_changes();
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
    title.textContent = title.title = model.get("title");
    notes.textContent = (model.get("notes") || []).join(" · ");
    slider.max = String(Math.max(0, model.get("n_steps") - 1));
    slider.value = String(model.get("step"));
    frameSlider.max = String(Math.max(0, model.get("n_frames") - 1));
    frameSlider.value = String(model.get("frame"));
    modeSel.value = model.get("heat_mode");
    styleSel.value = model.get("overlay_style");
    opacity.value = String(model.get("opacity"));
    greyBox.checked = !!model.get("grey");
    colorbar.style.background = model.get("colorbar");
    help.textContent = model.get("help");
    fillSelect(decoderSel, model.get("decoder_options") || [], model.get("decoder"));
    decoderSel.parentElement.style.display = (model.get("decoder_options") || []).length > 1 ? "" : "none";
    fillSelect(layerSel, model.get("layer_options") || [], model.get("layers"));
    layerSel.parentElement.style.display = (model.get("layer_options") || []).length ? "" : "none";
    fillMaps();
    fillSelect(batchSel, model.get("batch_options") || [], model.get("batch"));
    batchSel.parentElement.style.display = (model.get("batch_options") || []).length > 1 ? "" : "none";
    buildPanels();
    rebuildFrameUrls();
    rebuildHeatUrls();
    buildChips();
    show();
  }

  // ---- the keyboard: the panel keeps its keys (JupyterLab would move cells, collapse headings)
  root.addEventListener("keydown", (ev) => {
    const t = ev.target;
    // a menu or another slider (opacity) keeps its own keys; the step and frame sliders' are the
    // panel's (Home / End on the frame slider move the step, as everywhere in the panel)
    const typing = t && (t.tagName === "SELECT" ||
                         (t.tagName === "INPUT" && t !== slider && t !== frameSlider));
    let handled = true;
    if (ev.key === "ArrowLeft" && !typing) setStep(currentStep() - 1);
    else if (ev.key === "ArrowRight" && !typing) setStep(currentStep() + 1);
    else if (ev.key === "ArrowUp" && !typing && model.get("n_frames") > 1) setFrame(currentFrame() + 1);
    else if (ev.key === "ArrowDown" && !typing && model.get("n_frames") > 1) setFrame(currentFrame() - 1);
    else if ((ev.key === "ArrowUp" || ev.key === "ArrowDown") && !typing) { /* no notebook scroll */ }
    else if (ev.key === "Home" && !typing) setStep(0);
    else if (ev.key === "End" && !typing) setStep(model.get("n_steps") - 1);
    else if ((ev.key === " " || ev.code === "Space") && !typing) {
      model.set("playing", !model.get("playing"));
      model.save_changes();
      syncPlaying();
    } else handled = false;
    if (handled) ev.preventDefault();
    ev.stopPropagation();
  });
  root.addEventListener("keyup", (ev) => ev.stopPropagation());
  root.addEventListener("keypress", (ev) => ev.stopPropagation());
  root.addEventListener("mousedown", (ev) => {
    // clicking an image or empty space focuses the panel (inputs keep their own focus)
    if (!["INPUT", "SELECT", "BUTTON"].includes(ev.target.tagName)) root.focus({ preventScroll: true });
  });

  // ---- events from the user
  // after a menu choice the panel takes the keys back (←/→ step again, not the menu)
  for (const sel of [modeSel, layerSel, mapsSel, scaleSel, batchSel, styleSel, decoderSel]) {
    sel.addEventListener("change", () => root.focus({ preventScroll: true }));
  }
  slider.addEventListener("input", () => {
    show();
    saveStep(currentStep());
  });
  frameSlider.addEventListener("input", () => setFrame(Number(frameSlider.value)));
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
  greyBox.addEventListener("change", () => {
    model.set("grey", greyBox.checked);
    model.save_changes();
    show();
  });
  styleSel.addEventListener("change", () => {
    model.set("overlay_style", styleSel.value);
    model.save_changes();
    show();
  });
  decoderSel.addEventListener("change", () => {
    status.textContent = "decoding…";
    model.set("decoder", decoderSel.value);
    model.save_changes();
  });
  layerSel.addEventListener("change", () => {
    status.textContent = "loading heatmaps…";
    model.set("layers", layerSel.value);
    model.save_changes();
  });
  scaleSel.addEventListener("change", () => {
    status.textContent = "loading maps…";
    model.set("concept_scale", scaleSel.value);
    model.save_changes();
  });
  mapsSel.addEventListener("change", () => {
    status.textContent = "loading maps…";
    model.set("maps", mapsSel.value);
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
    "change:panels": () => { buildPanels(); show(); status.textContent = ""; },
    "change:overlay_style": () => { styleSel.value = model.get("overlay_style"); show(); },
    "change:decoder": () => { decoderSel.value = model.get("decoder"); },
    "change:decoder_options": () => fillSelect(decoderSel, model.get("decoder_options") || [], model.get("decoder")),
    "change:title": () => { title.textContent = title.title = model.get("title"); status.textContent = ""; },
    "change:step": () => {
      if (Number(slider.value) !== model.get("step")) { slider.value = String(model.get("step")); show(); }
    },
    "change:frame": () => {
      if (Number(frameSlider.value) !== model.get("frame")) { frameSlider.value = String(model.get("frame")); show(); }
    },
    "change:n_frames": () => { frameSlider.max = String(Math.max(0, model.get("n_frames") - 1)); show(); },
    "change:word": () => show(),
    "change:heat_mode": () => { modeSel.value = model.get("heat_mode"); show(); },
    "change:opacity": () => { opacity.value = String(model.get("opacity")); show(); },
    "change:grey": () => { greyBox.checked = !!model.get("grey"); show(); },
    "change:heat_index": () => show(),
    "change:playing": () => syncPlaying(),
    "change:fps": () => syncPlaying(),
    "change:layers": () => { layerSel.value = model.get("layers"); },
    "change:maps": () => { fillMaps(); buildChips(); show(); },
    "change:concept_scale": () => { fillMaps(); buildChips(); show(); },
    "change:heat_norms": () => show(),
    "change:maps_options": () => fillMaps(),
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
