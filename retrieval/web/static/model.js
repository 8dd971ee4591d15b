// facefind model page: the checkpoint's per-attribute accuracy, F1 and AP as bars, and its training
// curves (loss, mean accuracy, macro F1 per epoch) as SVG line charts. No external assets.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; };

function bar(value, cls) {
  const wrap = el("div", "hbar " + cls);
  const fill = document.createElement("div");
  fill.style.width = value === null || value === undefined ? "0" : (100 * value).toFixed(1) + "%";
  wrap.append(fill, el("span", "", value === null || value === undefined ? "n/a" : value.toFixed(3)));
  return wrap;
}

function metrics(report) {
  const box = document.getElementById("metrics");
  const per = report.val_metrics && report.val_metrics.per_attribute;
  if (!per) { box.textContent = "This model's checkpoint records no validation metrics."; return; }
  const grid = el("div", "metric-grid");
  grid.append(el("div", "head", "attribute (sorted by F1)"), el("div", "head", "accuracy"), el("div", "head", "F1"),
              el("div", "head", "average precision"));
  const names = Object.keys(per).sort((a, b) => (per[b].f1 ?? -1) - (per[a].f1 ?? -1));
  for (const name of names) {
    const m = per[name];
    const label = el("div", "name", name);
    label.title = `support ${m.support}, threshold ${m.threshold.toFixed(2)}`;
    grid.append(label, bar(m.accuracy, "acc"), bar(m.f1, "f1"), bar(m.average_precision, "ap"));
  }
  box.replaceChildren(grid);
}

function chart(title, series, yMax) {
  const W = 460, H = 230, L = 42, R = 10, T = 24, B = 34;
  const pts = series.flatMap((s) => s.values.filter((v) => v[1] !== null && v[1] !== undefined));
  const box = el("div", "chart");
  if (!pts.length) return null;
  const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  const y0 = yMax === 1 ? Math.max(0, Math.min(...ys) - 0.05) : 0, y1 = yMax === 1 ? Math.min(1, Math.max(...ys) + 0.05) : Math.max(...ys) * 1.05 || 1;
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), sy = (y) => T + (1 - (y - y0) / (y1 - y0 || 1)) * (H - T - B);
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("role", "img"); svg.setAttribute("aria-label", title);
  const add = (tag, attrs, text) => { const n = document.createElementNS(SVG, tag); for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v); if (text !== undefined) n.textContent = text; svg.appendChild(n); return n; };
  add("text", { x: L, y: 14, "font-weight": "600" }, title);
  add("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#98a2b3" });
  add("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#98a2b3" });
  for (let i = 0; i <= 4; i++) { const y = y0 + (y1 - y0) * i / 4; add("text", { x: 4, y: sy(y) + 4 }, y.toFixed(2)); add("line", { x1: L, y1: sy(y), x2: W - R, y2: sy(y), stroke: "#eef0f3" }); }
  add("text", { x: W / 2, y: H - 2, "text-anchor": "middle" }, "epoch");
  // the epoch axis: whole epochs, at most ~10 ticks
  const step = Math.max(1, Math.ceil((x1 - x0) / 10));
  for (let e = Math.ceil(x0); e <= x1; e += step) {
    add("line", { x1: sx(e), y1: H - B, x2: sx(e), y2: H - B + 4, stroke: "#98a2b3" });
    add("text", { x: sx(e), y: H - B + 15, "text-anchor": "middle" }, String(e));
  }
  for (const s of series) {
    const v = s.values.filter((p) => p[1] !== null && p[1] !== undefined);
    if (!v.length) continue;
    add("polyline", { points: v.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "), fill: "none", stroke: s.color, "stroke-width": 2 });
    for (const p of v) add("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: s.color });
  }
  const legend = el("div", "legend");
  for (const s of series) { const item = el("span"); const sw = el("i"); sw.style.background = s.color; item.append(sw, s.name); legend.appendChild(item); }
  box.append(svg, legend);
  return box;
}

function curves(report) {
  const box = document.getElementById("curves");
  const h = report.history || [];
  if (!h.length) { box.textContent = "This model's checkpoint holds no training history."; return; }
  const s = (key, pick) => h.map((r) => [r.epoch, pick(r)]);
  const charts = [
    chart("loss", [{ name: "train", color: "#4c8bf5", values: s("train", (r) => r.train_loss) },
                   { name: "validation", color: "#cf222e", values: s("val", (r) => r.val_loss) }]),
    chart("validation, at the calibrated thresholds", [
      { name: "mean accuracy", color: "#4c8bf5", values: s("acc", (r) => r.val && r.val.mean_accuracy) },
      { name: "macro F1", color: "#1a7f37", values: s("f1", (r) => r.val && r.val.macro_f1) },
      { name: "mean AP", color: "#bf8700", values: s("ap", (r) => r.val && r.val.mean_average_precision) }], 1),
  ].filter(Boolean);
  box.replaceChildren(...charts);
}

(async function start() {
  const res = await fetch("/api/model");
  const report = await res.json();
  const summary = document.getElementById("summary");
  if (!res.ok) { summary.textContent = report.error || `HTTP ${res.status}`; return; }
  const v = report.val_metrics || {};
  summary.textContent = `${report.arch || "model"} · ${report.attributes.length} attributes · ` +
    (report.epoch ? `epoch ${report.epoch} (best ${report.best_epoch}) · ` : "") +
    (v.mean_accuracy !== undefined ? `validation mean accuracy ${v.mean_accuracy.toFixed(3)}, macro F1 ${v.macro_f1.toFixed(3)}` : "no validation metrics") +
    (report.checkpoint ? ` · ${report.checkpoint}` : "");
  metrics(report);
  curves(report);
})();
