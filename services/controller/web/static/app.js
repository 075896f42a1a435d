// Bootfleet dashboard: sorting and filtering tables, confirmed actions, live updates over server-sent events.
// Served by the controller itself; nothing is fetched from anywhere else.
"use strict";

const sortState = {};  // table id -> {col, dir}

function cellValue(row, col) {
  const cell = row.cells[col];
  const v = cell ? cell.getAttribute("data-sort") ?? cell.textContent : "";
  const n = Number(v);
  return v !== "" && !Number.isNaN(n) ? n : v.toLowerCase();
}

function applySort(table) {
  const s = sortState[table.id];
  if (!s) return;
  const body = table.tBodies[0];
  const rows = Array.from(body.rows).filter(r => r.cells.length > 1);
  rows.sort((a, b) => {
    const x = cellValue(a, s.col), y = cellValue(b, s.col);
    return (x < y ? -1 : x > y ? 1 : 0) * s.dir;
  });
  rows.forEach(r => body.appendChild(r));
  table.querySelectorAll("th").forEach((th, i) => th.setAttribute("aria-sort", i === s.col ? (s.dir > 0 ? "ascending" : "descending") : "none"));
}

function applyFilter(input) {
  const table = document.getElementById(input.dataset.table);
  if (!table) return;
  const words = input.value.toLowerCase().split(/\s+/).filter(Boolean);
  Array.from(table.tBodies[0].rows).forEach(r => {
    const text = r.textContent.toLowerCase();
    r.hidden = !words.every(w => text.includes(w));
  });
}

function wire(root) {
  root.querySelectorAll("table.sortable th").forEach(th => {
    th.addEventListener("click", () => {
      const table = th.closest("table"), col = Number(th.dataset.col);
      const s = sortState[table.id];
      sortState[table.id] = {col, dir: s && s.col === col ? -s.dir : 1};
      applySort(table);
    });
  });
  root.querySelectorAll("table.sortable").forEach(applySort);
  root.querySelectorAll("input.filter").forEach(input => {
    input.addEventListener("input", () => applyFilter(input));
    applyFilter(input);
  });
  root.querySelectorAll("button.action").forEach(b => b.addEventListener("click", () => confirmAction(b)));
}

function flash(text, ok) {
  const el = document.getElementById("flash");
  el.textContent = text;
  el.className = ok ? "ok" : "error";
}

function confirmAction(button) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = button.dataset.confirm;
  const label = document.getElementById("confirm-input-label"), input = document.getElementById("confirm-input");
  label.hidden = !button.dataset.input;
  if (button.dataset.input) {
    label.querySelector("span").textContent = button.dataset.inputLabel;
    input.value = button.dataset.inputValue || "";
  }
  dialog.onclose = () => {
    if (dialog.returnValue !== "ok") return;
    const args = JSON.parse(button.dataset.args || "{}");
    if (button.dataset.input) {
      const n = Number(input.value);
      args[button.dataset.input] = input.value !== "" && !Number.isNaN(n) ? n : input.value;
    }
    send(button.dataset.command, args);
  };
  dialog.returnValue = "";
  dialog.showModal();
}

async function send(command, args) {
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  flash(command + "…", true);
  try {
    const r = await fetch("/api/" + encodeURIComponent(command), {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf},
      body: JSON.stringify(args),
    });
    const answer = await r.json();
    if (r.status === 401) flash(answer.text + " — log in (top right) with the token", false);
    else if (answer.result === 2) flash(command + ": unsupported by this controller (" + answer.text + ")", false);
    else flash(answer.text, answer.result === 0 || answer.result === 3);
  } catch (err) {
    flash(command + ": " + err, false);
  }
  refresh();
}

let refreshTimer = null, refreshing = false;

async function refresh() {
  if (refreshing) { refreshSoon(); return; }
  refreshing = true;
  try {
    const r = await fetch(location.href, {credentials: "same-origin"});
    const doc = new DOMParser().parseFromString(await r.text(), "text/html");
    const fresh = doc.getElementById("main");
    const main = document.getElementById("main");
    if (fresh && main) {
      // keep what the user typed in a filter box
      const filters = {};
      main.querySelectorAll("input.filter").forEach(i => { filters[i.id] = i.value; });
      main.innerHTML = fresh.innerHTML;
      main.querySelectorAll("input.filter").forEach(i => { if (i.id in filters) i.value = filters[i.id]; });
      wire(main);
      document.body.dataset.refreshed = String(Date.now());
    }
  } finally {
    refreshing = false;
  }
}

// At most one refresh per half second however fast events come (a debounce would starve under a steady flow).
function refreshSoon() {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 500);
}

function live() {
  if (document.body.dataset.live !== "1" || !window.EventSource) return;
  const status = document.getElementById("live");
  const source = new EventSource("/events/stream");
  source.onopen = () => { status.textContent = "live"; status.className = "live on"; };
  source.onerror = () => { status.textContent = "reconnecting…"; status.className = "live off"; };
  source.onmessage = msg => {
    const ev = JSON.parse(msg.data);
    status.textContent = "live · " + ev.type;
    refreshSoon();
  };
}

wire(document);
live();
