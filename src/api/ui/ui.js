"use strict";
// The lanrage web UI: the party at a glance, live.
//
// Served by the daemon with a strict Content-Security-Policy (no inline code, nothing from
// another origin). The page follows the daemon through one EventSource on /events (an event
// "snapshot" carrying {status, parties}, at once and on every change) and reconnects with
// backoff when it drops. Every string that came from the network is set with textContent or as
// an attribute value, never parsed as HTML. Actions POST to /party/create, /party/join and
// /party/leave with the session cookie that `lanrage ui`'s one-time link set.

const $ = (id) => document.getElementById(id);

// Latency history per member (for the sparkline): the last five minutes, bounded.
const HISTORY_MS = 5 * 60 * 1000;
const HISTORY_MAX = 1200;
// Reconnect backoff for the event stream.
const RETRY_FIRST_MS = 1000;
const RETRY_MAX_MS = 30000;

const NOT_LOGGED_IN = "Not logged in: run `lanrage ui` on this computer and open the link it prints";

// The page's own words for errors the daemon marks with a code (its message is worded for the
// command line).
const MESSAGES = {
  password_required: "This party is protected: type its password, then Join.",
  wrong_password: "Wrong password.",
  too_many_attempts: "Too many wrong passwords from here; wait a minute.",
};

// ---------- small helpers ----------

// Sets an element's text only when it changed (keeps a selection alive across updates).
function setText(el, text) {
  const t = String(text);
  if (el.textContent !== t) el.textContent = t;
}

function el(tag, className, text) {
  const e = document.createElement(tag);
  if (className) e.className = className;
  if (text !== undefined) e.textContent = String(text);
  return e;
}

const str = (v, dflt) => (typeof v === "string" ? v : dflt);
const num = (v) => (typeof v === "number" && Number.isFinite(v) ? v : null);

function fmtBytes(n) {
  const v0 = num(n);
  if (v0 === null || v0 < 0) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = v0;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return i === 0 ? `${v} B` : `${v.toFixed(v < 10 ? 2 : 1)} ${units[i]}`;
}

function fmtMs(ms) {
  const v = num(ms);
  if (v === null) return "–";
  return `${v.toFixed(v < 1 ? 3 : v < 10 ? 2 : 1)} ms`;
}

function fmtAgo(secs) {
  const s = num(secs);
  if (s === null) return "never";
  if (s < 120) return `${Math.floor(s)} s ago`;
  if (s < 7200) return `${Math.floor(s / 60)} min ago`;
  return `${Math.floor(s / 3600)} h ago`;
}

function pathText(peer) {
  switch (peer.connection) {
    case "self": return "this node";
    case "direct": return "direct";
    case "relayed": return typeof peer.relay === "string" ? `relayed via ${peer.relay}` : "relayed";
    case "connecting": return "connecting…";
    case "failed": return "no path";
    default: return str(peer.connection, "unknown");
  }
}

// ---------- errors and login ----------

function showError(message) {
  setText($("err"), message || "");
}

function showLogin(needed) {
  $("login").hidden = !needed;
}

async function checkSession() {
  try {
    const r = await fetch("/session", { credentials: "same-origin" });
    const s = await r.json();
    showLogin(s.authenticated !== true);
  } catch (_) {
    // The event stream shows whether the daemon is reachable.
  }
}

// ---------- actions ----------

let busy = false;

function setBusy(b) {
  busy = b;
  for (const button of document.querySelectorAll("button.action")) button.disabled = b;
  $("main").setAttribute("aria-busy", b ? "true" : "false");
}

async function post(path, body) {
  let r;
  try {
    r = await fetch(path, {
      method: "POST",
      credentials: "same-origin",
      headers: body ? { "Content-Type": "application/json" } : {},
      body: body ? JSON.stringify(body) : undefined,
    });
  } catch (_) {
    throw new Error("Could not reach the daemon: is it running?");
  }
  let j = null;
  try {
    j = await r.json();
  } catch (_) {
    // Not JSON (for example a proxy's page): the status line is all we have.
  }
  if (r.status === 401) {
    showLogin(true);
    throw new Error(NOT_LOGGED_IN);
  }
  if (!r.ok) {
    const code = j && typeof j.code === "string" ? j.code : "";
    const error = j && typeof j.error === "string" ? j.error : `${r.status} ${r.statusText}`;
    throw new Error(Object.prototype.hasOwnProperty.call(MESSAGES, code) ? MESSAGES[code] : error);
  }
  return j;
}

// Runs one request at a time; every action button is disabled meanwhile.
async function act(path, body, done) {
  if (busy) return;
  setBusy(true);
  try {
    await post(path, body);
    showError("");
    showLogin(false);
    if (done) done();
  } catch (e) {
    showError(e.message);
  } finally {
    setBusy(false);
  }
}

function withPassword(body, password) {
  if (password) body.password = password;
  return body;
}

async function copyPartyId() {
  const code = $("party-id");
  const id = code.textContent;
  if (!id) return;
  let copied = false;
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(id);
      copied = true;
    } catch (_) {
      // Denied (no permission, no focus): fall back to selecting it.
    }
  }
  if (!copied) {
    const selection = window.getSelection();
    selection.selectAllChildren(code);
    try {
      copied = document.execCommand("copy");
    } catch (_) {
      copied = false;
    }
  }
  const status = $("copied");
  status.textContent = copied ? "Copied" : "Selected: press Ctrl+C to copy";
  clearTimeout(copyPartyId.timer);
  copyPartyId.timer = setTimeout(() => { status.textContent = ""; }, 4000);
}

// ---------- rendering ----------

function renderNode(node) {
  setText($("node-name"), str(node.name, "?"));
  setText($("node-vip"), str(node.virtual_ip, "none (not in a party)"));
  setText($("node-nat"), str(node.nat_type, "unknown"));
  setText($("node-public"), str(node.public_endpoint, "unknown"));
  const server = str(node.control_server, "");
  $("node-control-label").hidden = !server;
  $("node-control").hidden = !server;
  const error = str(node.control_error, "");
  setText($("node-control"), error ? `${server} (error: ${error})` : server);
}

// Member id -> [{t, v}] latency samples, and id -> table row.
const history = new Map();
const rows = new Map();
const SVG = "http://www.w3.org/2000/svg";
const SPARK_W = 80;
const SPARK_H = 20;

function record(peers, now) {
  const ids = new Set();
  for (const peer of peers) {
    const id = str(peer.id, "");
    ids.add(id);
    let samples = history.get(id);
    if (!samples) {
      samples = [];
      history.set(id, samples);
    }
    const v = num(peer.latency_ms);
    if (v !== null && v >= 0) samples.push({ t: now, v });
    while (samples.length > 0 && (samples[0].t < now - HISTORY_MS || samples.length > HISTORY_MAX)) {
      samples.shift();
    }
  }
  for (const id of [...history.keys()]) if (!ids.has(id)) history.delete(id);
}

function sparkPoints(samples, now) {
  if (samples.length === 0) return "";
  let max = 0;
  for (const s of samples) max = Math.max(max, s.v);
  max = max > 0 ? max * 1.15 : 1;
  // The x axis spans the history we have (at least 30 s, at most HISTORY_MS), so a fresh
  // member's line fills the box instead of hugging its right edge.
  const span = Math.min(HISTORY_MS, Math.max(30000, now - samples[0].t));
  const pts = samples.map((s) => {
    const x = SPARK_W - ((now - s.t) / span) * SPARK_W;
    const y = SPARK_H - 1 - (s.v / max) * (SPARK_H - 2);
    return `${x.toFixed(1)},${y.toFixed(1)}`;
  });
  // One sample draws a short flat line so it is visible.
  if (pts.length === 1) pts.unshift(`${(SPARK_W - 2).toFixed(1)},${pts[0].split(",")[1]}`);
  return pts.join(" ");
}

// Column key and header text (the header text labels each cell in the phone layout).
const COLUMNS = [
  ["name", "Name"], ["vip", "Virtual IP"], ["path", "Path"], ["latency", "Latency"],
  ["handshake", "Last handshake"], ["rx", "In"], ["tx", "Out"],
];

function makeRow() {
  const tr = el("tr");
  tr.setAttribute("role", "row");
  const cells = {};
  for (const [k, label] of COLUMNS) {
    cells[k] = el("td", `c-${k}`);
    cells[k].setAttribute("role", "cell");
    cells[k].dataset.label = label;
    tr.append(cells[k]);
  }
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", `0 0 ${SPARK_W} ${SPARK_H}`);
  svg.setAttribute("width", String(SPARK_W));
  svg.setAttribute("height", String(SPARK_H));
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("focusable", "false");
  const bg = document.createElementNS(SVG, "rect");
  bg.setAttribute("class", "spark-bg");
  bg.setAttribute("width", String(SPARK_W));
  bg.setAttribute("height", String(SPARK_H));
  svg.append(bg);
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "currentColor");
  line.setAttribute("stroke-width", "1.5");
  svg.append(line);
  const ms = el("span", "ms");
  const lat = el("span", "lat");
  lat.append(svg, ms);
  cells.latency.append(lat);
  return { tr, cells, svg, line, ms };
}

function renderMembers(party, now) {
  const tbody = $("members");
  const peers = Array.isArray(party.peers) ? party.peers : [];
  record(peers, now);
  const seen = new Set();
  peers.forEach((peer, i) => {
    const id = str(peer.id, "");
    seen.add(id);
    let row = rows.get(id);
    if (!row) {
      row = makeRow();
      rows.set(id, row);
    }
    if (tbody.children[i] !== row.tr) tbody.insertBefore(row.tr, tbody.children[i] || null);
    const host = id === party.host_id;
    setText(row.cells.name, host ? `${str(peer.name, "?")} (host)` : str(peer.name, "?"));
    row.tr.classList.toggle("self", peer.connection === "self");
    setText(row.cells.vip, str(peer.virtual_ip, ""));
    setText(row.cells.path, pathText(peer));
    row.cells.path.className = `c-path path-${str(peer.connection, "unknown").replace(/[^a-z]/g, "")}`;
    const self = peer.connection === "self";
    setText(row.ms, self ? "–" : fmtMs(peer.latency_ms));
    row.svg.setAttribute("class", self ? "spark spark-none" : "spark");
    row.line.setAttribute("points", self ? "" : sparkPoints(history.get(id) || [], now));
    setText(row.cells.handshake, self ? "–" : fmtAgo(peer.last_handshake_secs));
    setText(row.cells.rx, self ? "–" : fmtBytes(peer.rx_bytes));
    setText(row.cells.tx, self ? "–" : fmtBytes(peer.tx_bytes));
  });
  for (const [id, row] of rows) {
    if (!seen.has(id)) {
      row.tr.remove();
      rows.delete(id);
    }
  }
}

function renderParty(status, now) {
  const party = status.party;
  $("party").hidden = !party;
  $("no-party").hidden = !!party;
  if (!party) {
    const joining = str(status.joining, "");
    setText($("no-party"), joining ? `Joining ${joining}…` : "Not in a party.");
    history.clear();
    for (const row of rows.values()) row.tr.remove();
    rows.clear();
    return;
  }
  setText($("party-name"), str(party.name, "?"));
  setText($("party-id"), str(party.id, ""));
  setText($("party-access"), party.protected ? "protected" : "open");
  renderMembers(party, now);
}

// Party id -> {li, name, protected, details, password, button}.
const nearby = new Map();

function makeNearby(p) {
  const name = str(p.name, "?");
  const li = el("li", "nearby-entry");
  const info = el("div", "nearby-info");
  info.append(el("strong", "nearby-name", name));
  if (p.protected) info.append(" ", el("span", "badge", "protected"));
  const details = el("span", "muted nearby-details");
  info.append(" ", details);
  const form = el("form", "row nearby-join");
  let password = null;
  if (p.protected) {
    password = el("input");
    password.type = "password";
    password.autocomplete = "off";
    password.placeholder = "Password";
    password.setAttribute("aria-label", `Password for ${name}`);
    form.append(password);
  }
  const button = el("button", "action", `Join ${name}`);
  button.type = "submit";
  button.disabled = busy;
  form.append(button);
  const id = str(p.id, "");
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    act("/party/join", withPassword({ party_id: id }, password ? password.value : ""), () => {
      if (password) password.value = "";
    });
  });
  li.append(info, form);
  return { li, name, protected: !!p.protected, details };
}

function renderNearby(parties, currentId) {
  const list = $("nearby");
  const seen = new Set();
  let i = 0;
  for (const p of Array.isArray(parties) ? parties : []) {
    const id = str(p.id, "");
    if (!id || id === currentId || p.source === "local" || seen.has(id)) continue;
    seen.add(id);
    let entry = nearby.get(id);
    if (!entry || entry.name !== str(p.name, "?") || entry.protected !== !!p.protected) {
      const fresh = makeNearby(p);
      if (entry) entry.li.remove();
      nearby.set(id, fresh);
      entry = fresh;
    }
    if (list.children[i] !== entry.li) list.insertBefore(entry.li, list.children[i] || null);
    i += 1;
    const members = num(p.members);
    const count = members === null ? "" : ` · ${members} member${members === 1 ? "" : "s"}`;
    setText(entry.details, `hosted by ${str(p.host, "?")}${count} · seen via ${str(p.source, "?")}`);
  }
  for (const [id, entry] of nearby) {
    if (!seen.has(id)) {
      entry.li.remove();
      nearby.delete(id);
    }
  }
  $("no-nearby").hidden = nearby.size > 0;
}

function render(snapshot) {
  const status = snapshot && snapshot.status;
  if (!status || !status.node) return;
  const now = Date.now();
  renderNode(status.node);
  renderParty(status, now);
  renderNearby(snapshot.parties, status.party ? str(status.party.id, "") : "");
}

// ---------- the live stream ----------

let source = null;
let retryMs = RETRY_FIRST_MS;

function setConnection(state, text) {
  const conn = $("conn");
  conn.className = `conn conn-${state}`;
  setText(conn, text);
  $("main").classList.toggle("stale", state === "down");
}

// The daemon publishes about twice a second: this long without a snapshot means the stream is
// stuck (a laptop that slept, a half-open connection), although the browser reports no error.
const STALL_MS = 5000;
let lastSnapshotAt = 0;

// Our own backoff rather than the browser's fixed retry: close, wait, open again.
function reconnect() {
  if (source) source.close();
  source = null;
  setConnection("down", "Disconnected, retrying…");
  const delay = retryMs * (0.8 + Math.random() * 0.4);
  retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
  setTimeout(connect, delay);
}

function connect() {
  source = new EventSource("/events");
  lastSnapshotAt = Date.now();
  source.addEventListener("snapshot", (ev) => {
    let snapshot;
    try {
      snapshot = JSON.parse(ev.data);
    } catch (_) {
      return;
    }
    lastSnapshotAt = Date.now();
    retryMs = RETRY_FIRST_MS;
    setConnection("live", "Live");
    render(snapshot);
  });
  source.addEventListener("error", reconnect);
}

setInterval(() => {
  if (source && Date.now() - lastSnapshotAt > STALL_MS) reconnect();
}, 1000);

document.addEventListener("DOMContentLoaded", () => {
  $("copy").addEventListener("click", copyPartyId);
  $("leave").addEventListener("click", () => act("/party/leave"));
  $("join").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const body = withPassword({ party_id: $("join-id").value.trim() }, $("join-password").value);
    act("/party/join", body, () => {
      $("join").reset();
    });
  });
  $("create").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const body = withPassword({ name: $("create-name").value }, $("create-password").value);
    act("/party/create", body, () => {
      $("create").reset();
    });
  });
  checkSession();
  connect();
});
