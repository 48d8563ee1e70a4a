// sdlens ReferenceView front end: the output and the reference images with heat overlays;
// a click sets `direction` / `point` (patch coordinates), the slider sets `step`.
function toUrl(dv) {
  if (!dv || dv.byteLength === 0) return "";
  return URL.createObjectURL(new Blob([dv], { type: "image/png" }));
}

function render({ model, el }) {
  let urls = [];
  const root = document.createElement("div");
  root.className = "sdl-refview";
  el.appendChild(root);

  function figure(base, overlay, grid, onClick, caption) {
    const px = model.get("px");
    const box = document.createElement("div");
    box.style.cssText = `display:inline-block;margin:4px;position:relative;width:${px}px`;
    const img = document.createElement("img");
    const u = toUrl(base);
    urls.push(u);
    img.src = u;
    img.width = px;
    img.height = px;
    img.style.cursor = "crosshair";
    box.appendChild(img);
    if (overlay && overlay.byteLength) {
      const ov = document.createElement("img");
      const v = toUrl(overlay);
      urls.push(v);
      ov.src = v;
      ov.width = px;
      ov.height = px;
      ov.style.cssText = "position:absolute;left:0;top:0;pointer-events:none";
      box.appendChild(ov);
      if (model.get("grey")) img.style.filter = "grayscale(1)";  // hue is the heat's alone
    }
    img.addEventListener("click", (e) => {
      const r = img.getBoundingClientRect();
      const y = Math.min(grid[0] - 1, Math.floor(((e.clientY - r.top) / r.height) * grid[0]));
      const x = Math.min(grid[1] - 1, Math.floor(((e.clientX - r.left) / r.width) * grid[1]));
      onClick(y, x);
    });
    const cap = document.createElement("div");
    cap.textContent = caption;
    box.appendChild(cap);
    return box;
  }

  function draw() {
    urls.forEach((u) => u && URL.revokeObjectURL(u));
    urls = [];
    root.innerHTML = "";
    const title = document.createElement("div");
    title.className = "sdl-title";
    title.textContent = model.get("title");
    root.appendChild(title);
    const steps = model.get("steps");
    const slider = document.createElement("input");
    slider.type = "range";
    slider.min = 0;
    slider.max = Math.max(0, steps.length - 1);
    slider.value = model.get("step");
    const label = document.createElement("span");
    label.textContent = ` step ${steps[model.get("step")]}`;
    slider.addEventListener("input", () => {
      model.set("step", parseInt(slider.value));
      model.save_changes();
    });
    root.appendChild(slider);
    root.appendChild(label);
    const row = document.createElement("div");
    const click = (direction) => (y, x) => {
      model.set("direction", direction);
      model.set("point", [y, x]);
      model.save_changes();
    };
    const p = model.get("point");
    const dir = model.get("direction");
    row.appendChild(figure(model.get("output"), model.get("output_overlay"),
      model.get("output_grid"), click("output"),
      dir === "output" ? `output · point (${p[0]}, ${p[1]})` : "output"));
    const overlays = model.get("reference_overlays");
    model.get("references").forEach((ref, i) => {
      const name = `reference ${i}`;
      row.appendChild(figure(ref, overlays[i], model.get("reference_grids")[i], click(name),
        `image ${i + 1}` + (dir === name ? ` · point (${p[0]}, ${p[1]})` : "")));
    });
    root.appendChild(row);
  }

  draw();
  for (const name of ["output_overlay", "reference_overlays", "step", "point", "direction", "grey", "title"]) {
    model.on(`change:${name}`, draw);
  }
  return () => urls.forEach((u) => u && URL.revokeObjectURL(u));
}

export default { render };
