// The People view: a grid of persons (representative face, name, count). A click searches
// `person:ID`, so the chips and the expression box then work inside that person. Read-only:
// names, merges and splits are made with `facefind people` on the command line.
// Uses app.js's globals (els, search, api), loaded before this file.
"use strict";

const people = {
  view: document.createElement("section"),
  button: document.getElementById("people-btn"),
};
people.view.id = "people";
people.view.hidden = true;
people.view.setAttribute("aria-label", "people");
document.querySelector("main").prepend(people.view);

// By id, never by name: app.js's chip editing re-splits the expression on words and would cut a
// quoted name ("Ada Lovelace") apart.
function personQuery(p) { return `person:${p.id}`; }

function personLabel(p) { return p.name || `person ${p.id}`; }

async function showPeople() {
  let res;
  try { res = await api("/api/people?limit=2000"); } catch (err) { showError(err); return; }
  clearError();
  const cards = res.persons.map((p) => {
    const d = document.createElement("button");
    d.type = "button";
    d.className = "person";
    d.dataset.id = p.id;
    const img = document.createElement("img");
    img.loading = "lazy"; img.alt = ""; img.src = `/api/images/${p.representative}/thumb`;
    const name = document.createElement("span"); name.className = "pname"; name.textContent = personLabel(p);
    const count = document.createElement("span"); count.className = "pcount"; count.textContent = `${p.count} faces`;
    d.append(img, name, count);
    d.addEventListener("click", () => openPerson(p));
    return d;
  });
  const head = document.createElement("div");
  head.className = "phead";
  head.textContent = `${res.total} persons` + (res.total > res.persons.length ? ` (the ${res.persons.length} largest shown)` : "");
  people.view.replaceChildren(head, ...cards);
  togglePeople(true);
}

function togglePeople(on) {
  people.view.hidden = !on;
  for (const id of ["grid", "empty", "status"]) {
    const el = document.getElementById(id);
    if (el) el.style.display = on ? "none" : "";
  }
  people.button.classList.toggle("on", on);
}

function openPerson(p) {
  togglePeople(false);
  const q = personQuery(p);
  els.expr.value = q;
  search({ q, offset: 0, sel: null });
}

// The face panel names the person a face belongs to (app.js calls this after drawing the panel).
window.personLine = async function personLine(id, panel) {
  let who;
  try { who = await api(`/api/people/of/${id}`); } catch { return; }  // no persons: say nothing
  if (who.id === null || panel.hidden) return;
  const line = document.createElement("div");
  line.className = "personline";
  const a = document.createElement("a");
  a.href = "#"; a.textContent = personLabel(who);
  a.addEventListener("click", (ev) => { ev.preventDefault(); openPerson(who); });
  line.append("person: ", a);
  panel.querySelector(".path")?.after(line);
};

people.button.addEventListener("click", () => (people.view.hidden ? showPeople() : togglePeople(false)));
els.go.addEventListener("click", () => togglePeople(false));
