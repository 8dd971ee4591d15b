// facefind search page: plain JavaScript, no build step, no external assets.
// The whole state lives in the URL (?q=&like_id=&like=&ref=&by=&offset=&sel=), so links can be
// shared and the back button works. by=person ranks "similar" by identity (dlib descriptors; only
// offered when the index has them), by=look (the default) by the attribute model's embedding.
// The grid is virtual: only the rows near the viewport exist in the DOM, and pages of PAGE hits
// are fetched by offset, so 150,000 matches scroll like 60.
// An index built with --detect-faces has one entry per face of a photo: its card says which face,
// and its panel shows the whole photo with a box over each face of the file, each box opening
// that face's entry.
"use strict";

const PAGE = 60;
// What each ranking's score means (shown on hover over a card's score, and in the help)
const SCORE_HELP = {
  confidence: "confidence: how far the face clears the expression, as a log-odds margin (0: on a threshold; higher: clearer)",
  similarity: "similarity: cosine between this face's embedding and the reference's (1: the same)",
  person: "identity distance to the reference face (dlib; under 0.6: the same person)",
};
let MAX_UPLOAD = 20 * 1024 * 1024;  // the server's cap (/api/info's max_upload_bytes replaces it)
const $ = (id) => document.getElementById(id);
const els = {
  expr: $("expr"), suggest: $("suggest"), go: $("go"), thr: $("thr"), photo: $("photo"), error: $("error"),
  chips: $("chips"), count: $("count"), ref: $("ref"), quality: $("quality"), grid: $("grid"),
  empty: $("empty"), panel: $("panel"), drop: $("drop"), by: $("by"), detect: $("detect"),
  exp: { csv: $("exp-csv"), json: $("exp-json"), paths: $("exp-paths") },
};

let attributes = [];          // [{name, threshold, positive_rate, label_rate}]
let lowerNames = new Map();   // lower-case name -> canonical name
let state = readState();
let view = null;              // the current query: {key, total, n, ranking, pages: Map, pending: Set}
let generation = 0;           // bumps with every new query; stale answers are dropped
let localPhoto = null;        // object URL of the photo searched by, this session only
let localFile = null;         // that photo itself, to search by it again with the other ranking
let hasIdentity = false;      // the index has identity descriptors: offer Look / Person

// ---------------------------------------------------------------------------------- state <-> URL

function readState() {
  const p = new URLSearchParams(location.search);
  const id = p.get("like_id");
  return {
    q: p.get("q") || "",
    like_id: id && /^\d+$/.test(id) ? Number(id) : null,
    like: p.get("like") || null,
    ref: p.get("ref") || null,
    offset: Math.max(0, Number(p.get("offset")) || 0),
    sel: /^\d+$/.test(p.get("sel") || "") ? Number(p.get("sel")) : null,
    th: p.get("thresholds") || null,
    by: p.get("by") === "person" ? "person" : "look",
  };
}

function hasRef(s) { return s.like_id !== null || !!s.like; }

function stateURL(s) {
  const p = new URLSearchParams();
  if (s.q) p.set("q", s.q);
  if (s.like_id !== null) p.set("like_id", String(s.like_id));
  if (s.like) { p.set("like", s.like); if (s.ref) p.set("ref", s.ref); }
  if (s.offset) p.set("offset", String(s.offset));
  if (s.sel !== null) p.set("sel", String(s.sel));
  if (s.th) p.set("thresholds", s.th);
  if (s.by === "person") p.set("by", "person");
  const qs = p.toString();
  return location.pathname + (qs ? "?" + qs : "");
}

function commit(next, push = true) {
  state = { ...state, ...next };
  const url = stateURL(state);
  if (url !== location.pathname + location.search) {
    if (push) history.pushState(null, "", url); else history.replaceState(null, "", url);
  }
}

function queryParams(s, extra = {}) {
  const p = new URLSearchParams();
  if (s.q.trim()) p.set("q", s.q);
  if (s.like_id !== null) p.set("like_id", String(s.like_id));
  else if (s.like) p.set("like", s.like);
  if (s.th) p.set("thresholds", s.th);
  if (s.by === "person" && hasRef(s)) p.set("by", "person");
  for (const [k, v] of Object.entries(extra)) p.set(k, String(v));
  return p;
}

// ---------------------------------------------------------------------------------- API

async function api(path, init) {
  const res = await fetch(path, init);
  let body = null;
  try { body = await res.json(); } catch (e) { body = { error: `HTTP ${res.status}` }; }
  if (!res.ok) { const err = new Error(body.error || `HTTP ${res.status}`); err.body = body; err.status = res.status; throw err; }
  return body;
}

// ---------------------------------------------------------------------------------- expression

// Tokens of an expression, as the server's grammar sees them (enough to split top-level 'and').
function tokenize(text) {
  // Quoted values (person:"Ada Lovelace") are one token, so a chip click never cuts them apart.
  const re = /\s+|("[^"]*"|'[^']*')|(>=|<=|&&|\|\||[<>=&|!~():])|([A-Za-z0-9_.]+)/g;
  const out = [];
  let m;
  while ((m = re.exec(text)) !== null) {
    if (m[0].trim() === "") continue;
    out.push({ text: m[0], start: m.index, end: m.index + m[0].length });
  }
  return out;
}

// Top-level conjuncts: [{kind: 'require'|'exclude'|'other', name, text}].
function conjuncts(text) {
  const toks = tokenize(text);
  if (!toks.length) return [];
  let depth = 0, hasOr = false;
  const parts = [[]];
  for (const t of toks) {
    const w = t.text.toLowerCase();
    if (t.text === "(") depth++;
    if (t.text === ")") depth--;
    if (depth === 0 && (w === "or" || w === "|" || w === "||")) hasOr = true;
    if (depth === 0 && (w === "and" || w === "&" || w === "&&")) { parts.push([]); continue; }
    parts[parts.length - 1].push(t);
  }
  if (hasOr) return [{ kind: "other", name: null, text: "(" + text.trim() + ")" }];
  return parts.filter((p) => p.length).map((p) => {
    const words = p.map((t) => t.text);
    const canon = (w) => lowerNames.get(w.toLowerCase()) || null;
    if (words.length === 1 && canon(words[0])) return { kind: "require", name: canon(words[0]), text: canon(words[0]) };
    if (words.length === 2 && ["not", "!", "~"].includes(words[0].toLowerCase()) && canon(words[1]))
      return { kind: "exclude", name: canon(words[1]), text: "not " + canon(words[1]) };
    // `label:NAME` / `not label:NAME`: a ground-truth literal, keyed "label:NAME" (shift-click on a chip)
    const lab = /^(not\s+|[!~]\s*)?label\s*:\s*([A-Za-z0-9_]+)$/i.exec(text.slice(p[0].start, p[p.length - 1].end));
    if (lab && canon(lab[2])) return { kind: lab[1] ? "exclude" : "require", name: "label:" + canon(lab[2]),
                                       text: (lab[1] ? "not " : "") + "label:" + canon(lab[2]) };
    return { kind: "other", name: null, text: text.slice(p[0].start, p[p.length - 1].end) };
  });
}

function chipStates(text) {
  const out = new Map();
  for (const c of conjuncts(text)) {
    if (c.name) out.set(c.name, c.kind);
    else for (const t of tokenize(c.text)) { const n = lowerNames.get(t.text.toLowerCase()); if (n && !out.has(n)) out.set(n, "mention"); }
  }
  return out;
}

function cycleChip(name) {
  const parts = conjuncts(state.q);
  const now = (parts.find((c) => c.name === name) || { kind: "ignore" }).kind;
  const next = { ignore: "require", require: "exclude", exclude: "ignore" }[now];
  const kept = parts.filter((c) => c.name !== name);
  if (next === "require") kept.push({ text: name });
  if (next === "exclude") kept.push({ text: "not " + name });
  const q = kept.map((c) => c.text).join(" and ");
  els.expr.value = q;
  search({ q, offset: 0, sel: null });
}

function renderChips() {
  const st = chipStates(state.q);
  els.chips.replaceChildren(...attributes.map((a) => {
    const b = document.createElement("span");
    const kind = st.get(a.name) || "ignore";
    b.className = "chip " + kind;
    b.textContent = a.name;
    b.dataset.name = a.name;
    b.title = `${a.name}: ${kind === "require" ? "required" : kind === "exclude" ? "excluded" : kind === "mention" ? "in the expression" : "ignored"}` +
      ` · threshold ${a.threshold.toFixed(2)} · ${(100 * a.positive_rate).toFixed(1)}% of images` +
      (a.label_rate !== null ? ` (labels: ${(100 * a.label_rate).toFixed(1)}%)` : "") + " · click to cycle" +
      (a.label_rate !== null ? "; shift-click: require, exclude, ignore its label" : "");
    const labelKind = st.get("label:" + a.name);
    if (labelKind) b.classList.add("label-" + labelKind);
    b.addEventListener("click", (ev) => cycleChip(ev.shiftKey && a.label_rate !== null ? "label:" + a.name : a.name));
    return b;
  }));
}

// ---------------------------------------------------------------------------------- autocomplete

let active = -1;
function wordAtCaret() {
  const v = els.expr.value, at = els.expr.selectionStart ?? v.length;
  let s = at;
  while (s > 0 && /[A-Za-z0-9_]/.test(v[s - 1])) s--;
  let e = at;
  while (e < v.length && /[A-Za-z0-9_]/.test(v[e])) e++;
  return { start: s, end: e, word: v.slice(s, at) };
}

function updateSuggest() {
  const { word } = wordAtCaret();
  if (!word || /^\d*\.?\d+$/.test(word) || ["and", "or", "not"].includes(word.toLowerCase())) return hideSuggest();
  const w = word.toLowerCase();
  const starts = attributes.filter((a) => a.name.toLowerCase().startsWith(w));
  const inside = attributes.filter((a) => !a.name.toLowerCase().startsWith(w) && a.name.toLowerCase().includes(w));
  const list = [...starts, ...inside].slice(0, 8);
  if (!list.length || (list.length === 1 && list[0].name.toLowerCase() === w)) return hideSuggest();
  active = 0;
  els.suggest.replaceChildren(...list.map((a, i) => {
    const li = document.createElement("li");
    li.textContent = a.name; li.setAttribute("role", "option");
    if (i === 0) li.className = "on";
    li.addEventListener("mousedown", (ev) => { ev.preventDefault(); accept(a.name); });
    return li;
  }));
  els.suggest.hidden = false;
}

function hideSuggest() {
  const was = !els.suggest.hidden;
  els.suggest.hidden = true; active = -1;
  if (was) scheduleTyping();  // the word is done (or dismissed): now search it
}

function accept(name) {
  const { start, end } = wordAtCaret();
  const v = els.expr.value;
  els.expr.value = v.slice(0, start) + name + v.slice(end);
  const caret = start + name.length;
  els.expr.setSelectionRange(caret, caret);
  hideSuggest();
  scheduleTyping();
}

els.expr.addEventListener("keydown", (ev) => {
  const items = [...els.suggest.children];
  if (!els.suggest.hidden && items.length) {
    if (ev.key === "ArrowDown" || ev.key === "ArrowUp") {
      ev.preventDefault();
      active = (active + (ev.key === "ArrowDown" ? 1 : items.length - 1)) % items.length;
      items.forEach((li, i) => li.classList.toggle("on", i === active));
      return;
    }
    if (ev.key === "Tab" || (ev.key === "Enter" && active >= 0)) { ev.preventDefault(); accept(items[active].textContent); return; }
    if (ev.key === "Escape") { hideSuggest(); return; }
  }
  if (ev.key === "Enter") { ev.preventDefault(); clearTimeout(typingTimer); search({ q: els.expr.value, offset: 0, sel: null }); }
});
let typingTimer = 0;
function scheduleTyping() {
  clearTimeout(typingTimer);
  typingTimer = setTimeout(() => {
    // while suggestions are open the word is unfinished: searching now would flash "unknown attribute"
    if (!els.suggest.hidden) return;
    if (els.expr.value !== state.q) search({ q: els.expr.value, offset: 0, sel: null });
  }, 350);
}
els.expr.addEventListener("input", () => { updateSuggest(); scheduleTyping(); });
els.expr.addEventListener("blur", () => setTimeout(hideSuggest, 100));
els.go.addEventListener("click", () => search({ q: els.expr.value, offset: 0, sel: null }));
els.thr.addEventListener("change", () => search({ th: els.thr.value || null, offset: 0 }));

// ---------------------------------------------------------------------------------- errors

function showError(err) {
  const body = err.body || {};
  const box = els.error;
  box.replaceChildren();
  const msg = document.createElement("div");
  msg.textContent = body.error || err.message;
  box.appendChild(msg);
  if (typeof body.position === "number" && body.expression) {
    const pre = document.createElement("pre");
    const caret = document.createElement("b");
    caret.textContent = " ".repeat(body.position) + "^";
    pre.append(body.expression + "\n", caret);
    box.appendChild(pre);
    const m = /did you mean ([A-Za-z0-9_]+)/.exec(body.error || "");
    if (m) {
      const fix = document.createElement("button");
      fix.type = "button"; fix.className = "fix"; fix.textContent = `use ${m[1]}`;
      fix.addEventListener("click", () => {
        const toks = tokenize(body.expression);
        const bad = toks.find((t) => t.start === body.position);
        if (!bad) return;
        const q = body.expression.slice(0, bad.start) + m[1] + body.expression.slice(bad.end);
        els.expr.value = q;
        search({ q, offset: 0, sel: null });
      });
      msg.appendChild(fix);
    }
    els.expr.classList.add("bad");
  }
  box.hidden = false;
}

function clearError() { els.error.hidden = true; els.error.replaceChildren(); els.expr.classList.remove("bad"); }

// ---------------------------------------------------------------------------------- querying

function viewKey(s) { return JSON.stringify([s.q.trim(), s.like_id, s.like, s.th, hasRef(s) ? s.by : "look"]); }

async function search(next, push = true) {
  const candidate = { ...state, ...next };
  const gen = ++generation;
  const start = Math.floor(candidate.offset / PAGE) * PAGE;
  let first;
  try {
    first = await api("/api/query?" + queryParams(candidate, { limit: PAGE, offset: start, eval: "false" }));
  } catch (err) {
    if (gen !== generation) return;
    showError(err);
    return;
  }
  if (gen !== generation) return;
  clearError();
  commit(next, push);
  showResult(first, start);
  openPanelFromState();
  loadQuality(gen, start);
}

// The quality block (precision against the labels) costs the server a pass over every label:
// it is asked for after the grid is on screen, never in its way.
async function loadQuality(gen, start) {
  if (!state.q.trim()) return;
  try {
    const res = await api("/api/query?" + queryParams(state, { limit: PAGE, offset: start }));
    if (gen === generation) showQuality(res.quality);
  } catch (err) { /* the grid already shows any error */ }
}

function showQuality(q) {
  els.quality.textContent = q ? `against the labels: ${q.relevant} of these ${q.k} truly match · ` +
    `precision ${fmt(q.precision_all)}, recall ${fmt(q.recall)} over all matches (base rate ${fmt(q.base_rate)})` : "";
  relayout();
}

function relayout() { if (view) { layout(); queueDraw(); } }  // something above the grid changed height

function showResult(first, start) {
  view = { key: viewKey(state), total: first.total, n: first.n_indexed, ranking: first.ranking,
           pages: new Map([[start / PAGE, first.hits]]), pending: new Set(), nodes: new Map() };
  els.expr.value = state.q;
  renderChips();
  els.count.textContent = `${first.total.toLocaleString()} of ${first.n_indexed.toLocaleString()} images match`;
  showQuality(first.quality);
  renderRef();
  renderBy();
  updateExports();
  els.empty.hidden = first.total > 0;
  els.grid.replaceChildren();
  layout();
  if (state.offset) {
    const row = Math.floor(state.offset / cols());
    window.scrollTo(0, gridTop() + row * cellH());
  } else {
    window.scrollTo(0, 0);
  }
  draw();
}

function fmt(v) { return v === null || v === undefined ? "n/a" : v.toFixed(3); }

function renderRef() {
  els.ref.replaceChildren();
  if (state.like_id === null && !state.like) { els.ref.hidden = true; return; }
  const how = view && view.ranking === "person"
    ? "ranked by identity distance (under 0.6: same person) to" : "ranked by similarity to";
  if (state.like_id !== null) {
    const img = document.createElement("img");
    img.src = `/api/images/${state.like_id}/thumb`;
    els.ref.append(img, `${how} image #${state.like_id} `);
  } else {
    if (localPhoto) { const img = document.createElement("img"); img.src = localPhoto; els.ref.append(img); }
    els.ref.append(`${how} your photo ${state.ref || ""} `);
  }
  const clear = document.createElement("button");
  clear.type = "button"; clear.textContent = "× clear";
  clear.addEventListener("click", () => search({ like_id: null, like: null, ref: null, offset: 0 }));
  els.ref.append(clear);
  els.ref.hidden = false;
}

function updateExports() {
  for (const [fmtName, a] of Object.entries(els.exp)) a.href = "/api/export?" + queryParams(state, { format: fmtName });
}

// ---------------------------------------------------------------------------------- the virtual grid

// Geometry is read from the DOM only on layout (new result, resize), never per scrolled frame.
const geo = { w: 150, h: 232, cols: 1, top: 0 };
function measure() {
  const css = getComputedStyle(document.documentElement);
  geo.w = parseFloat(css.getPropertyValue("--cell-w")) || 150;
  geo.h = parseFloat(css.getPropertyValue("--cell-h")) || 232;
  geo.cols = Math.max(1, Math.floor(els.grid.clientWidth / geo.w));
  geo.w = els.grid.clientWidth / geo.cols;  // the columns share the whole width: no empty band at the right
  els.grid.style.setProperty("--cell-w", geo.w + "px");
  geo.top = els.grid.getBoundingClientRect().top + window.scrollY;
}
function cellW() { return geo.w; }
function cellH() { return geo.h; }
function cols() { return geo.cols; }
function gridTop() { return geo.top; }

function layout() {
  if (!view) return;
  // the panel opens below the header, never over its buttons
  document.documentElement.style.setProperty("--head-h", document.querySelector("header").offsetHeight + "px");
  measure();
  els.grid.style.height = Math.ceil(view.total / cols()) * cellH() + "px";
  measure();
}

function visibleRange() {
  const c = cols(), h = cellH();
  const top = window.scrollY - gridTop();
  const firstRow = Math.max(0, Math.floor(top / h) - 1);
  const lastRow = Math.floor((top + window.innerHeight) / h) + 1;
  return [firstRow * c, Math.min(view.total, (lastRow + 1) * c)];
}

let drawQueued = false;
function queueDraw() { if (!drawQueued) { drawQueued = true; requestAnimationFrame(() => { drawQueued = false; draw(); }); } }

function draw() {
  if (!view || !view.total) return;
  const [from, to] = visibleRange();
  const c = cols(), w = cellW(), h = cellH();
  for (const [i, node] of view.nodes) if (i < from || i >= to) { drop(node); view.nodes.delete(i); }
  for (let i = from; i < to; i++) {
    const page = Math.floor(i / PAGE);
    const hits = view.pages.get(page);
    const hit = hits ? hits[i - page * PAGE] : undefined;
    let node = view.nodes.get(i);
    if (node && node.dataset.filled === "0" && hit) { drop(node); node = null; }
    if (!node) {
      node = hit ? card(hit, i) : skeleton();
      node.style.transform = `translate(${(i % c) * w}px, ${Math.floor(i / c) * h}px)`;
      els.grid.appendChild(node);
      view.nodes.set(i, node);
    }
    if (!hits) loadPage(page);
  }
  rememberOffset(from);
}

function drop(node) {
  const img = node.querySelector("img");
  if (img && !img.complete) img.src = "";  // stop fetching what scrolled away
  node.remove();
}

function skeleton() {
  const d = document.createElement("div");
  d.className = "card skeleton"; d.dataset.filled = "0";
  d.innerHTML = '<div class="pic"></div>';
  return d;
}

function card(hit, i) {
  const d = document.createElement("div");
  d.className = "card" + (hit.id === state.sel ? " sel" : "");
  d.dataset.filled = "1"; d.dataset.id = hit.id; d.dataset.rank = i + 1;
  const pic = document.createElement("div"); pic.className = "pic";
  const img = document.createElement("img");
  img.className = "thumb"; img.decoding = "async"; img.alt = `image ${hit.id}`;
  img.src = `/api/images/${hit.id}/thumb`;
  pic.appendChild(img);
  if (hit.box) pic.appendChild(faceLabel(hit.face));
  const meta = document.createElement("div"); meta.className = "meta";
  const score = view.ranking === "similarity" ? hit.score.toFixed(3) : view.ranking === "confidence" ? hit.score.toFixed(2)
    : view.ranking === "person" ? `distance ${hit.distance.toFixed(3)}` : "";
  meta.innerHTML = `<span>#${i + 1}</span><span class="score"></span>`;
  meta.lastChild.textContent = score;
  meta.lastChild.title = SCORE_HELP[view.ranking] || "";
  const m = document.createElement("div"); m.className = "m";
  if (hit.same_person) {
    const same = document.createElement("span"); same.className = "same"; same.textContent = "✓ same person";
    same.title = "identity distance under 0.6: dlib's same-person threshold";
    m.appendChild(same);
  }
  for (const lit of hit.matched) { const s = document.createElement("span"); s.textContent = lit; if (lit.startsWith("not ")) s.className = "neg"; m.appendChild(s); }
  d.append(pic, meta, m);
  d.title = hit.box ? `${hit.path} (face ${hit.face})` : hit.path;
  d.addEventListener("click", () => { commit({ sel: hit.id }); markSelected(); openPanel(hit.id); });
  return d;
}

// "face N": which face of its photo an entry is (0 = the largest), as `query --json` numbers them.
function faceLabel(n) {
  const s = document.createElement("span"); s.className = "face"; s.textContent = `face ${n}`;
  s.title = "one face of a photo (0 = the largest)";
  return s;
}

function markSelected() { if (!view) return; for (const n of view.nodes.values()) n.classList.toggle("sel", Number(n.dataset.id) === state.sel); }

async function loadPage(page) {
  if (view.pending.has(page) || view.pages.has(page)) return;
  const v = view, gen = generation;
  v.pending.add(page);
  try {
    const res = await api("/api/query?" + queryParams(state, { limit: PAGE, offset: page * PAGE, eval: "false" }));
    if (gen !== generation || v !== view) return;
    v.pages.set(page, res.hits);
    if (v.pages.size > 60) { // keep memory bounded on very long scrolls
      const [far] = [...v.pages.keys()].sort((a, b) => Math.abs(b - page) - Math.abs(a - page));
      v.pages.delete(far);
    }
    queueDraw();
  } catch (err) {
    if (gen === generation) showError(err);
  } finally {
    v.pending.delete(page);
  }
}

let offsetTimer = 0;
function rememberOffset(from) {
  clearTimeout(offsetTimer);
  offsetTimer = setTimeout(() => {
    const first = Math.max(0, Math.floor(from / cols()) + 1) * cols();
    const offset = window.scrollY <= gridTop() ? 0 : Math.min(first, Math.max(0, view.total - 1));
    if (offset !== state.offset) commit({ offset }, false);
  }, 300);
}

window.addEventListener("scroll", queueDraw, { passive: true });
window.addEventListener("resize", () => { if (!view) return; layout(); for (const n of view.nodes.values()) drop(n); view.nodes.clear(); queueDraw(); });

// ---------------------------------------------------------------------------------- the face panel

function openPanelFromState() { if (state.sel !== null) openPanel(state.sel); else els.panel.hidden = true; }

let panelSeq = 0;  // bumps with every panel opened; a slower answer for an earlier one is dropped

async function openPanel(id) {
  const seq = ++panelSeq;
  let info;
  try {
    info = await api(`/api/images/${id}?` + new URLSearchParams({ ...(state.q.trim() ? { q: state.q } : {}),
                                                                     ...(state.th ? { thresholds: state.th } : {}) }));
  } catch (err) { if (seq === panelSeq) showError(err); return; }
  if (seq !== panelSeq) return;
  const p = els.panel;
  p.replaceChildren();
  const top = document.createElement("div"); top.className = "top";
  const title = document.createElement("strong"); title.textContent = `image #${info.id}`;
  const more = document.createElement("button"); more.className = "primary more"; more.type = "button";
  more.title = "rank the images that match the current expression by similarity to this one";
  more.addEventListener("click", () => search({ like_id: info.id, like: null, ref: null, offset: 0, sel: null }));
  const close = document.createElement("button"); close.type = "button"; close.textContent = "×"; close.title = "close";
  close.addEventListener("click", () => { els.panel.hidden = true; commit({ sel: null }); markSelected(); });
  top.append(title, more, makeBy(document.createElement("span")), close);
  let img;
  if (info.box) img = photoView(info);
  else { img = document.createElement("img"); img.className = "full"; img.src = `/api/images/${info.id}/full`; img.alt = ""; }
  const path = document.createElement("div"); path.className = "path";
  info.path.split("/").forEach((part, k, all) => {  // a line may break after a '/', never inside a name
    path.append(part + (k < all.length - 1 ? "/" : ""));
    if (k < all.length - 1) path.appendChild(document.createElement("wbr"));
  });
  path.append(" ");
  if (info.box) path.append(faceLabel(info.face), ` of ${info.faces.length}`);
  const matched = document.createElement("div");
  if (info.matched.length) matched.textContent = "matches: " + info.matched.join(", ");
  const table = document.createElement("table"); table.className = "probs";
  const head = document.createElement("tr");
  head.innerHTML = "<th>attribute</th><th>probability (| threshold)</th><th></th>" + (info.labels ? "<th>truth</th>" : "");
  table.appendChild(head);
  for (const name of Object.keys(info.attributes)) {
    const prob = info.attributes[name], thr = info.thresholds[name];
    const tr = document.createElement("tr");
    if (prob >= thr) tr.className = "on";
    tr.innerHTML = '<td class="name"></td><td><div class="track"><div class="fill"></div><div class="tick"></div></div></td><td class="val"></td>';
    tr.children[0].textContent = name;
    tr.querySelector(".fill").style.width = (100 * prob).toFixed(1) + "%";
    tr.querySelector(".tick").style.left = (100 * thr).toFixed(1) + "%";
    tr.children[2].textContent = prob.toFixed(3);
    if (info.labels) {
      const td = document.createElement("td");
      const yes = info.labels[name];
      td.className = "truth " + (yes ? "yes" : "no");
      td.textContent = yes === undefined ? "" : yes ? "✓ yes" : "no";
      tr.appendChild(td);
    }
    table.appendChild(tr);
  }
  p.append(top, img, path, matched, table);
  p.hidden = false;
  renderBy();
  if (window.personLine) window.personLine(info.id, p);  // people.js: the person this face belongs to
}

// The whole photo of a face entry, a box over each face of its file (the selected one
// highlighted), each a button that opens that face. Boxes are in the pixels of the decoded,
// EXIF-upright image, which is what the browser shows (naturalWidth/Height), so they are placed in
// percent of it and follow any displayed size. All faces load the file by its first face's id:
// one URL per file, so moving between its faces is served from the browser's cache.
function photoView(info) {
  const wrap = document.createElement("div"); wrap.className = "photo";
  const img = document.createElement("img"); img.className = "full"; img.alt = "";
  img.src = `/api/images/${info.faces[0].id}/full`;
  wrap.appendChild(img);
  const place = () => {
    const W = img.naturalWidth, H = img.naturalHeight;
    if (!W || !H) return;
    for (const f of info.faces) {
      if (!f.box) continue;
      const [x, y, w, h] = f.box;
      const b = document.createElement("button");
      b.type = "button"; b.className = "facebox" + (f.id === info.id ? " on" : "");
      b.dataset.id = f.id; b.dataset.face = f.face;
      b.title = `face ${f.face} (image #${f.id})` + (f.id === info.id ? ": shown" : ": open it");
      if (f.id === info.id) b.setAttribute("aria-current", "true");
      Object.assign(b.style, { left: `${100 * x / W}%`, top: `${100 * y / H}%`,
                               width: `${100 * w / W}%`, height: `${100 * h / H}%` });
      const n = document.createElement("span"); n.textContent = String(f.face);
      b.appendChild(n);
      b.addEventListener("click", () => {
        if (f.id === state.sel) return;
        commit({ sel: f.id }); markSelected(); openPanel(f.id);
      });
      wrap.appendChild(b);
    }
  };
  if (img.complete && img.naturalWidth) place(); else img.addEventListener("load", place, { once: true });
  return wrap;
}

// ---------------------------------------------------------------------------------- look / person

// A Look | Person switch (one in the header beside the photo search, one beside "More like this"):
// it re-ranks the current reference, and is the ranking the next "similar" search uses.
function makeBy(el) {
  el.className = "by"; el.setAttribute("role", "group"); el.setAttribute("aria-label", "similar by");
  el.replaceChildren(...["look", "person"].map((by) => {
    const b = document.createElement("button");
    b.type = "button"; b.dataset.by = by; b.textContent = by === "look" ? "Look" : "Person";
    b.title = by === "look" ? "similar faces: alike in look (hair, make-up, expression), by the attribute model"
      : "similar faces: the same person, by identity (dlib face descriptors; a distance under 0.6 is marked)";
    b.addEventListener("click", () => chooseBy(by));
    return b;
  }));
  return el;
}

function renderBy() {
  for (const el of document.querySelectorAll(".by")) {
    el.hidden = !hasIdentity;
    for (const b of el.children) {
      const on = b.dataset.by === state.by;
      b.classList.toggle("on", on); b.setAttribute("aria-pressed", String(on));
    }
  }
  const more = els.panel.querySelector("button.more");
  if (more) more.textContent = state.by === "person" ? "More of this person" : "More like this";
}

function chooseBy(by) {
  if (by === state.by) return;
  if (state.like_id !== null) { search({ by, offset: 0 }); return; }
  if (state.like) {
    if (localFile) { searchByPhoto(localFile, by); return; }
    showError(new Error(`your photo is not kept across page loads: search by it again to rank by ${by}`));
    return;
  }
  commit({ by });
  renderBy();
}

// ---------------------------------------------------------------------------------- search by photo

async function searchByPhoto(file, by = state.by) {
  if (!file) return;
  if (!hasIdentity) by = "look";
  if (file.size > MAX_UPLOAD) {  // checked here, before 20 MB travel to be refused
    showError(new Error(`${file.name} is ${(file.size / 1048576).toFixed(1)} MB, over the ${MAX_UPLOAD / 1048576} MB `
      + "this server takes: send a smaller photo (a face needs far less)"));
    return;
  }
  const form = new FormData();
  form.append("file", file, file.name);
  form.append("detect_face", els.detect.checked ? "auto" : "false");
  if (state.q.trim()) form.append("q", state.q);
  if (state.th) form.append("thresholds", state.th);
  form.append("limit", String(PAGE));
  form.append("by", by);
  els.count.textContent = by === "person" ? `finding the face in ${file.name}…` : `embedding ${file.name}…`;
  let res;
  const gen = ++generation;
  try {
    res = await api("/api/similar", { method: "POST", body: form });
  } catch (err) { if (gen === generation) { showError(err); els.count.textContent = ""; } return; }
  if (gen !== generation) return;
  if (localPhoto) URL.revokeObjectURL(localPhoto);
  localPhoto = URL.createObjectURL(file);
  localFile = file;
  clearError();
  // The URL keeps the server's short reference (a content hash, kept a day), not the vector.
  commit({ like: res.reference.id, ref: res.reference.name, like_id: null, by, offset: 0, sel: null });
  showResult(res, 0);
  els.panel.hidden = true;
}

els.photo.addEventListener("change", () => { searchByPhoto(els.photo.files[0]); els.photo.value = ""; });
let dragDepth = 0;
window.addEventListener("dragenter", (ev) => { if ([...ev.dataTransfer.types].includes("Files")) { dragDepth++; els.drop.hidden = false; } });
window.addEventListener("dragleave", () => { dragDepth = Math.max(0, dragDepth - 1); if (!dragDepth) els.drop.hidden = true; });
window.addEventListener("dragover", (ev) => ev.preventDefault());
window.addEventListener("drop", (ev) => {
  ev.preventDefault(); dragDepth = 0; els.drop.hidden = true;
  const file = [...(ev.dataTransfer.files || [])].find((f) => f.type.startsWith("image/")) || ev.dataTransfer.files[0];
  searchByPhoto(file);
});

// ---------------------------------------------------------------------------------- start

window.addEventListener("popstate", () => {
  const next = readState();
  els.expr.value = next.q;
  els.thr.value = next.th || "";
  if (viewKey(next) === (view && view.key)) { state = next; openPanelFromState(); markSelected(); renderBy(); return; }
  search(next, false);
});

(async function start() {
  els.expr.value = state.q;
  makeBy(els.by);
  const first = search({}, false);  // the first page and the chips' data load side by side
  try {
    const res = await api("/api/attributes");
    attributes = res.attributes;
    lowerNames = new Map(attributes.map((a) => [a.name.toLowerCase(), a.name]));
    els.thr.replaceChildren(...res.threshold_sets.map((name) => {
      const o = document.createElement("option");
      o.value = name === res.default_thresholds ? "" : name;
      o.textContent = `${name} thresholds` + (name === res.default_thresholds ? " (default)" : "");
      return o;
    }));
    els.thr.value = state.th && res.threshold_sets.includes(state.th) ? state.th : "";
    els.thr.hidden = res.threshold_sets.length < 2;
    hasIdentity = !!res.has_identity;
    if (!hasIdentity && state.by === "person") {  // a link from an index with identities
      commit({ by: "look" }, false);
      if (hasRef(state)) search({}, false);
    }
    renderBy();
    // Typed before the names arrived: suggest for what is there now, not at the next keystroke.
    if (document.activeElement === els.expr) updateSuggest();
  } catch (err) { showError(err); }
  await first;
  renderChips();
  relayout();
})();
