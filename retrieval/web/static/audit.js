// facefind audit page: labels beside predictions (bars per attribute) and a heatmap of attribute x
// group gaps, drawn from /api/audit (or, in `facefind audit --html`'s file, from the inlined
// window.AUDIT). Every bar and cell is a link to the search page's query for those faces.
"use strict";

const AUDIT_FILE = window.AUDIT || null;  // {report, base}: a self-contained report file
const el = (tag, cls, text) => { const e = document.createElement(tag); if (cls) e.className = cls; if (text !== undefined) e.textContent = text; return e; };
const pct = (v) => (v === null || v === undefined ? "n/a" : (100 * v).toFixed(1) + "%");
const num = (v) => (v === null || v === undefined ? "n/a" : v.toFixed(3));

// The search page's URL for an expression; a report file without a base URL has no server to ask.
function searchURL(q) {
  const base = AUDIT_FILE ? AUDIT_FILE.base : "";
  return AUDIT_FILE && !base ? null : `${base || ""}/?q=${encodeURIComponent(q)}`;
}

function link(q, content, cls) {
  const url = searchURL(q);
  const a = el(url ? "a" : "span", cls);
  if (url) a.href = url;
  a.title = q;
  a.dataset.q = q;
  a.append(...[].concat(content));
  return a;
}

function bar(value, cls) {
  const b = el("span", "a-bar " + cls);
  const fill = el("i");
  fill.style.width = value === null || value === undefined ? "0" : (100 * value).toFixed(1) + "%";
  b.append(fill);
  return b;
}

function summary(r) {
  const c = r.coverage;
  const box = el("div");
  const splits = c.splits ? " (" + Object.entries(c.splits).filter(([, n]) => n).map(([k, n]) => `${k} ${n.toLocaleString()}`).join(", ") + ")" : "";
  box.append(el("div", "", `${c.entries.toLocaleString()} of ${c.indexed.toLocaleString()} entries${splits}` +
    (c.where ? ` where ${c.where}` : "") + `; ${c.with_labels.toLocaleString()} carry ground-truth labels; ` +
    `${r.thresholds} thresholds; a confident disagreement is ${r.confident_margin} log-odds or more from the threshold.`));
  for (const w of r.warnings) box.append(el("div", "warn", "⚠ " + w));
  document.getElementById("a-summary").replaceChildren(box);
}

function bars(r) {
  const grid = el("div", "a-rows");
  const legend = el("span", "a-legend");
  legend.append(el("i", "label"), "label", el("i", "pred"), "predicted");
  grid.append(el("div", "head", "attribute"), el("div", "head"), el("div", "head", "F1 against the labels"),
              el("div", "head", "missed (label, not predicted)"), el("div", "head", "false alarms"));
  grid.children[1].append(legend);
  for (const a of r.attributes) {
    const name = el("div", "name", a.attribute);
    const rates = el("div");
    if (a.label_positive) rates.append(link(a.label_positive.query, [bar(a.label_rate, "label")], "a-pair"));
    rates.append(link(a.predicted.query, [bar(a.predicted_rate, "pred")], "a-pair"));
    rates.title = `label ${pct(a.label_rate)}, predicted ${pct(a.predicted_rate)}`;
    const f1 = el("div");
    const fn = el("div"), fp = el("div");
    if (a.false_negatives) {
      const both = `(${a.false_negatives.query}) or (${a.false_positives.query})`;
      f1.append(link(both, [bar(a.f1, "f1"), el("span", "a-num", `F1 ${num(a.f1)} · AP ${num(a.ap)}`)], "a-pair"));
      for (const [box, d] of [[fn, a.false_negatives], [fp, a.false_positives]]) {
        box.append(link(d.query, `${d.count.toLocaleString()} (${d.confident.toLocaleString()} confident)`, "a-num"));
      }
    } else {
      f1.append(el("span", "a-num", "no labels"));
    }
    grid.append(name, rates, f1, fn, fp);
  }
  document.getElementById("a-bars").replaceChildren(grid);
}

// Cell colour: white at no gap, deep red at a gap of 0.5 or more.
function heat(v) {
  if (v === null || v === undefined) return "#f2f4f7";
  const t = Math.min(1, v / 0.5);
  return `rgb(255,${Math.round(255 - 160 * t)},${Math.round(255 - 170 * t)})`;
}

function heatmap(r) {
  const box = document.getElementById("a-heat");
  if (!r.groups.length) { box.textContent = "No grouping asked for (by: none)."; return; }
  const key = r.checked_against_labels ? "equalized_odds" : "demographic_parity";
  document.getElementById("a-heat-title").textContent = r.checked_against_labels
    ? "Gaps between groups: equalized-odds difference (largest of the TPR and FPR gaps); click for the worse group's errors"
    : "Gaps between groups: demographic-parity difference of predictions (nothing checked against labels)";
  const table = el("table", "heat");
  const head = el("tr");
  head.append(el("th", "", "attribute"));
  for (const g of r.groups) {
    const th = el("th", "", `by ${g.by}`);
    th.title = `${g.groups[0].name} (${g.groups[0].entries}) vs ${g.groups[1].name} (${g.groups[1].entries}), by ${g.source}`;
    head.append(th);
  }
  table.append(head);
  const names = r.attributes.map((a) => a.attribute);
  for (const name of names) {
    const tr = el("tr");
    tr.append(el("th", "", name));
    for (const g of r.groups) {
      const td = el("td");
      const gap = g.gaps[name];
      if (gap) {
        const cell = link(gap.query, num(gap[key]));
        cell.style.background = heat(gap[key]);
        cell.dataset.attribute = name;
        cell.dataset.by = g.by;
        cell.title = `${name} by ${g.by}: ${key.replace("_", " ")} ${num(gap[key])}, worse: ${gap.worse}\n${gap.query}`;
        td.append(cell);
      } else {
        td.append(el("span", "", "—"));
      }
      tr.append(td);
    }
    table.append(tr);
  }
  box.replaceChildren(table);
}

function gaps(r) {
  const key = r.checked_against_labels ? "equalized_odds" : "demographic_parity";
  const list = document.getElementById("a-gaps");
  list.replaceChildren(...r.largest_gaps.slice(0, 5).map((g) => {
    const li = el("li");
    li.append(link(g.query, `${g.attribute} by ${g.by}: ${num(g[key])}`), el("span", "a-num", ` worse: ${g.worse}`));
    return li;
  }));
}

function draw(r) { summary(r); bars(r); heatmap(r); gaps(r); }

async function load() {
  if (AUDIT_FILE) {
    for (const e of document.querySelectorAll(".served")) e.hidden = true;
    draw(AUDIT_FILE.report);
    return;
  }
  const params = new URLSearchParams(location.search);
  const form = document.getElementById("a-form");
  form.hidden = false;
  document.getElementById("a-where").value = params.get("where") || "";
  document.getElementById("a-by").value = params.get("by") || "";
  form.addEventListener("submit", (ev) => {  // empty fields leave the defaults
    ev.preventDefault();
    const next = new URLSearchParams();
    for (const k of ["where", "by"]) { const v = document.getElementById("a-" + k).value.trim(); if (v) next.set(k, v); }
    location.search = next.toString();
  });
  const api = new URLSearchParams();
  for (const k of ["where", "by", "thresholds", "top"]) if (params.get(k)) api.set(k, params.get(k));
  const res = await fetch("/api/audit?" + api.toString());
  const body = await res.json();
  const err = document.getElementById("error");
  if (!res.ok) { err.textContent = body.error || `error ${res.status}`; err.hidden = false; document.getElementById("a-summary").textContent = ""; return; }
  err.hidden = true;
  draw(body);
}

load();
