// sdlens GridViewer front end: a labelled table of thumbnails; clicking a cell selects it.
function toUrl(dv) {
  if (!dv || dv.byteLength === 0) return "";
  const first = dv.getUint8(0);  // PNG, GIF (a video grid's clips, played by the browser), JPEG
  const type = first === 0x89 ? "image/png" : first === 0x47 ? "image/gif" : "image/jpeg";
  return URL.createObjectURL(new Blob([dv], { type }));
}

function render({ model, el }) {
  let urls = [];
  const root = document.createElement("div");
  root.className = "sdl-grid";
  el.appendChild(root);

  function draw() {
    urls.forEach((u) => u && URL.revokeObjectURL(u));
    root.innerHTML = "";
    const title = document.createElement("div");
    title.className = "sdl-title";
    title.textContent = model.get("title");
    root.appendChild(title);
    const axisLine = document.createElement("div");
    axisLine.className = "sdl-axis";
    axisLine.textContent = model.get("axis_text");
    root.appendChild(axisLine);
    const cols = model.get("col_labels");
    const rows = model.get("row_labels");
    const thumbs = model.get("thumbs");
    const px = model.get("cell_px");
    urls = thumbs.map(toUrl);
    const table = document.createElement("table");
    const head = document.createElement("tr");
    head.appendChild(document.createElement("th"));
    for (const c of cols) {
      const th = document.createElement("th");
      th.textContent = c;
      head.appendChild(th);
    }
    table.appendChild(head);
    const selected = model.get("selected");
    rows.forEach((rlabel, r) => {
      const tr = document.createElement("tr");
      const th = document.createElement("th");
      th.textContent = rlabel;
      th.style.whiteSpace = "pre-line";
      tr.appendChild(th);
      cols.forEach((_, c) => {
        const i = r * cols.length + c;
        const td = document.createElement("td");
        const img = document.createElement("img");
        img.className = "sdl-cell" + (i === selected ? " sdl-cell-on" : "");
        img.src = urls[i];
        img.width = px;
        img.dataset.cell = String(i);
        img.title = `${rlabel.replace(/\n/g, ", ")}${rlabel ? ", " : ""}${cols[c]}: click for its steps`;
        img.addEventListener("click", () => {
          model.set("selected", i);
          model.save_changes();
          for (const o of root.querySelectorAll(".sdl-cell")) o.classList.toggle("sdl-cell-on", o === img);
        });
        td.appendChild(img);
        tr.appendChild(td);
      });
      table.appendChild(tr);
    });
    root.appendChild(table);
  }

  const events = ["change:thumbs", "change:col_labels", "change:row_labels", "change:title"];
  events.forEach((e) => model.on(e, draw));
  const onSel = () => {
    const s = model.get("selected");
    for (const o of root.querySelectorAll(".sdl-cell")) o.classList.toggle("sdl-cell-on", Number(o.dataset.cell) === s);
  };
  model.on("change:selected", onSel);
  draw();
  return () => {
    events.forEach((e) => model.off(e, draw));
    model.off("change:selected", onSel);
    urls.forEach((u) => u && URL.revokeObjectURL(u));
  };
}

export default { render };
