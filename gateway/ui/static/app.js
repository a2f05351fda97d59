// ledgergate dashboard: vanilla JS, no build step. Data from /ui/api/* (the forensic
// queries the CLI uses) and live decisions from /ui/stream (server-sent events).
"use strict";
const REFUSED = new Set(["deny", "rate_limited", "invalid_arguments"]);
const $ = (sel, root = document) => root.querySelector(sel);
const MAX_ROWS = 500;

function showError(msg) {
  const p = $("#error");
  p.textContent = msg || "";
  p.hidden = !msg;
}

async function api(view, params = {}) {
  const q = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== "" && v != null));
  const resp = await fetch(`/ui/api/${view}?${q}`, { credentials: "same-origin" });
  const doc = await resp.json();
  if (!resp.ok) {
    if (resp.status === 401) location.reload();
    throw new Error(doc.message || resp.statusText);
  }
  return doc;
}

function rowsOf(doc) {
  return doc.rows.map((r) => Object.fromEntries(doc.columns.map((c, i) => [c, r[i]])));
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function fill(table, rows, cols) {
  const body = $("tbody", table);
  body.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    for (const c of cols) cell(tr, r[c]);
    body.appendChild(tr);
  }
}

const fmtTime = (ts) => {
  if (ts == null) return "";
  const d = typeof ts === "number" ? new Date(ts) : new Date(ts);
  return isNaN(d) ? String(ts) : d.toISOString().replace("T", " ").slice(0, 23);
};

// ---- tabs ----------------------------------------------------------------------------
const loaders = {};
function show(view) {
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.view === view);
  for (const s of document.querySelectorAll(".view")) s.classList.toggle("active", s.id === `view-${view}`);
  showError("");
  if (loaders[view]) loaders[view]().catch((e) => showError(e.message));
}

// ---- live ----------------------------------------------------------------------------
const live = new Map(); // call_id -> row
function liveFilters() {
  return Object.fromEntries(new FormData($("#live-filters")).entries());
}
function matches(tr, f) {
  const d = tr.dataset;
  if (f.server && d.server !== f.server) return false;
  if (f.agent && !d.agent.includes(f.agent)) return false;
  if (f.tool && !d.tool.includes(f.tool)) return false;
  if (f.decision === "refused") return REFUSED.has(d.decision);
  if (f.decision && d.decision !== f.decision) return false;
  return true;
}
function applyFilters() {
  const f = liveFilters();
  for (const tr of live.values()) tr.hidden = !matches(tr, f);
}
function addCall(ev, atTop = true) {
  if (live.has(ev.call_id)) return live.get(ev.call_id);
  const tr = document.createElement("tr");
  const tool = ev.tool || ev.method || "";
  Object.assign(tr.dataset, { callId: ev.call_id, server: ev.server || "", agent: ev.agent || "", tool, decision: ev.decision || "" });
  tr.className = REFUSED.has(ev.decision) ? "refused" : "allowed";
  cell(tr, fmtTime(ev.ts));
  cell(tr, ev.server);
  cell(tr, ev.agent);
  cell(tr, tool);
  cell(tr, ev.decision, "decision");
  cell(tr, ev.rule);
  cell(tr, ev.outcome, "outcome");
  cell(tr, ev.upstream_ms == null ? "" : Number(ev.upstream_ms).toFixed(1), "upstream");
  tr.addEventListener("click", () => openCall(ev.call_id));
  const body = $("#live-table tbody");
  if (atTop) body.prepend(tr); else body.appendChild(tr);
  live.set(ev.call_id, tr);
  tr.hidden = !matches(tr, liveFilters());
  while (live.size > MAX_ROWS) {
    const last = body.lastElementChild;
    live.delete(last.dataset.callId);
    last.remove();
  }
  return tr;
}
function completeCall(ev) {
  const tr = live.get(ev.call_id);
  if (!tr) return;
  $(".outcome", tr).textContent = ev.outcome || "";
  $(".upstream", tr).textContent = ev.upstream_ms == null ? "" : Number(ev.upstream_ms).toFixed(1);
}
async function loadRecent() {
  const doc = await api("calls", { limit: 100 });
  for (const r of rowsOf(doc)) addCall(r, false);
}
function connect() {
  const es = new EventSource("/ui/stream");
  const state = $("#stream-state");
  es.onopen = () => { state.textContent = "live"; state.dataset.state = "live"; };
  es.onerror = () => { state.textContent = "reconnecting…"; state.dataset.state = "down"; };
  es.addEventListener("decided", (m) => addCall(JSON.parse(m.data)));
  es.addEventListener("completed", (m) => completeCall(JSON.parse(m.data)));
}

// ---- other views -----------------------------------------------------------------------
loaders.refusals = async () => {
  const doc = await api("refusals", Object.fromEntries(new FormData($("#refusals-form")).entries()));
  const rows = rowsOf(doc).map((r) => ({ ...r, minute: fmtTime(r.minute).slice(0, 16) }));
  fill($("#refusals-table"), rows, ["minute", "rule", "decision", "count"]);
  const chart = $("#refusals-chart");
  chart.replaceChildren();
  const max = Math.max(1, ...rows.map((r) => r.count));
  for (const r of rows) {
    const bar = document.createElement("div");
    bar.className = "bar";
    const label = document.createElement("span");
    label.textContent = `${r.minute} ${r.rule}`;
    const f = document.createElement("span");
    f.className = "fill";
    f.style.width = `${(20 * r.count) / max}rem`;
    const n = document.createElement("span");
    n.textContent = r.count;
    bar.append(label, f, n);
    chart.appendChild(bar);
  }
};
loaders.top = async () => {
  const p = Object.fromEntries(new FormData($("#top-form")).entries());
  fill($("#top-agents"), rowsOf(await api("top_agents", p)), ["agent", "calls", "refused"]);
  fill($("#top-tools"), rowsOf(await api("top_tools", p)), ["tool", "calls", "refused"]);
};
loaders.who = async () => {
  const p = Object.fromEntries(new FormData($("#who-form")).entries());
  const rows = rowsOf(await api("who", p)).map((r) => ({ ...r, first: fmtTime(r.first), last: fmtTime(r.last) }));
  fill($("#who-table"), rows, ["agent", "grant", "allowed", "refused", "first", "last"]);
};
loaders.inventory = async () => {
  const doc = await api("inventory");
  const rows = doc.rows.map((r) => ({ ...r, limits: r.limits.join("; "), arguments_schema: r.arguments_schema ? "yes" : "", redact: r.redact.join(", ") }));
  fill($("#inventory-table"), rows, ["server", "tool", "action", "rule", "limits", "arguments_schema", "redact"]);
};
loaders.call = async () => {
  const id = $("#call-form [name=call_id]").value;
  if (!id) return;
  const rows = rowsOf(await api("call", { call_id: id }));
  const body = $("#call-record tbody");
  body.replaceChildren();
  if (!rows.length) { showError(`no call ${id} in the audit tables (yet)`); return; }
  for (const [k, v] of Object.entries(rows[0])) {
    const tr = document.createElement("tr");
    tr.dataset.field = k;
    const th = document.createElement("th");
    th.textContent = k;
    tr.appendChild(th);
    cell(tr, k === "ts" ? fmtTime(v) : v);
    body.appendChild(tr);
  }
};
// ---- approvals -------------------------------------------------------------------------
// The queue is polled (an in-memory list on the gateway: cheap); rows are updated in place so
// a comment being typed survives the refresh.
const APPROVALS_POLL_MS = 2000;
const pending = new Map(); // approval id -> row
const fmtSecs = (s) => (s >= 90 ? `${Math.floor(s / 60)} min ${Math.round(s % 60)} s` : `${Math.round(s)} s`);
function approvalRow(a) {
  const tr = document.createElement("tr");
  tr.dataset.id = a.id;
  Object.assign(tr.dataset, { server: a.server, tool: a.tool, callId: a.call_id || "" });
  cell(tr, a.id, "id");
  cell(tr, a.server);
  cell(tr, a.tool);
  cell(tr, a.agent && a.agent !== a.grant ? `${a.agent} (${a.grant})` : a.grant);
  cell(tr, JSON.stringify(a.arguments ?? {}, null, 1), "args");
  cell(tr, "", "waiting");
  cell(tr, "", "left");
  const td = cell(tr, "", "act");
  const comment = document.createElement("input");
  comment.name = "comment";
  comment.placeholder = "comment (the agent reads it)";
  const approve = document.createElement("button");
  approve.className = "approve";
  approve.textContent = "Approve";
  const deny = document.createElement("button");
  deny.className = "deny";
  deny.textContent = "Deny";
  approve.addEventListener("click", () => decide(a.id, "approve", comment.value));
  deny.addEventListener("click", () => decide(a.id, "deny", comment.value));
  const box = document.createElement("div");
  box.className = "controls";
  box.append(comment, approve, deny);
  td.appendChild(box);
  return tr;
}
function renderApprovals(list) {
  const body = $("#approvals-table tbody");
  const seen = new Set();
  for (const a of list) {
    seen.add(a.id);
    let tr = pending.get(a.id);
    if (!tr) {
      tr = approvalRow(a);
      pending.set(a.id, tr);
      body.appendChild(tr);
    }
    $(".waiting", tr).textContent = fmtSecs(a.waiting_s);
    $(".left", tr).textContent = fmtSecs(a.expires_in_s);
  }
  for (const [id, tr] of pending) {
    if (!seen.has(id)) { tr.remove(); pending.delete(id); }
  }
  countApprovals();
}
function countApprovals() {
  const count = $("#approvals-count");
  count.textContent = String(pending.size);
  count.hidden = pending.size === 0;
  $("#approvals-empty").hidden = pending.size > 0;
}
async function pollApprovals() {
  try {
    renderApprovals((await api("approvals")).pending);
  } catch (e) {
    if ($("#view-approvals").classList.contains("active")) showError(e.message);
  }
  setTimeout(pollApprovals, APPROVALS_POLL_MS);
}
async function decide(id, decision, comment) {
  const tr = pending.get(id);
  if (tr) for (const b of tr.querySelectorAll("button")) b.disabled = true;
  try {
    const resp = await fetch(`/ui/api/approvals/${encodeURIComponent(id)}`, {
      method: "POST",
      credentials: "same-origin",
      // the gateway refuses the POST without it: a cross-site form cannot set a header
      headers: { "Content-Type": "application/json", "X-Requested-With": "ledgergate-ui" },
      body: JSON.stringify({ decision, comment }),
    });
    const doc = await resp.json();
    if (!resp.ok) {
      if (resp.status === 401) location.reload();
      throw new Error(doc.message || resp.statusText);
    }
    const r = doc.resolution;
    const li = document.createElement("li");
    li.dataset.id = r.id;
    li.dataset.outcome = r.outcome;
    li.textContent = `${fmtTime(r.at * 1000)} ${r.id} ${r.server}/${r.tool} ${r.outcome} by ${r.by}` + (r.comment ? `: ${r.comment}` : "");
    $("#approvals-done").prepend(li);
    if (tr) { tr.remove(); pending.delete(id); }
    countApprovals();
  } catch (e) {
    showError(e.message);
    if (tr) for (const b of tr.querySelectorAll("button")) b.disabled = false;
  }
}
loaders.approvals = async () => renderApprovals((await api("approvals")).pending);

function openCall(id) {
  $("#call-form [name=call_id]").value = id;
  show("call");
}

document.addEventListener("DOMContentLoaded", () => {
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => show(b.dataset.view));
  for (const id of ["refusals", "top", "who", "call"]) {
    $(`#${id}-form`).addEventListener("submit", (e) => { e.preventDefault(); show(id); });
  }
  $("#live-filters").addEventListener("input", applyFilters);
  $("#live-filters").addEventListener("submit", (e) => e.preventDefault());
  connect();
  loadRecent().catch((e) => showError(e.message));
  pollApprovals();
});
