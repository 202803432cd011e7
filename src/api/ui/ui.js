"use strict";
// The lanrage web UI. Served from the daemon with a strict Content-Security-Policy: no inline
// code, every name from the network escaped before it reaches innerHTML.
const $ = (s) => document.querySelector(s);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;", "'": "&#39;"}[c]));

class NeedsLogin extends Error {}

// The page's own words for errors the daemon marks with a code (its message is worded for the
// command line).
const MESSAGES = {
  password_required: "This party is protected: type its password in the password field, then Join.",
  wrong_password: "Wrong password.",
  too_many_attempts: "Too many wrong passwords from here; wait a minute.",
};

async function call(method, path, body) {
  const r = await fetch(path, {
    method,
    headers: body ? {"Content-Type": "application/json"} : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  const j = await r.json();
  if (r.status === 401) {
    showLogin(true);
    throw new NeedsLogin(j.error || "not logged in");
  }
  if (!r.ok) throw new Error(MESSAGES[j.code] || j.error || r.statusText);
  return j;
}

function showLogin(needed) {
  $("#login").hidden = !needed;
}

async function checkSession() {
  try {
    const s = await call("GET", "/session");
    showLogin(!s.authenticated);
  } catch (e) { /* the status refresh reports errors */ }
}

async function refresh() {
  try {
    const s = await call("GET", "/status");
    $("#node").textContent = `${s.node.name} · ${s.node.id} · ${s.node.virtual_ip ?? "no virtual IP"} · NAT ${s.node.nat_type}`;
    if (s.party) {
      const ms = (l) => l == null ? "" : esc(l.toFixed(l < 10 ? 2 : 1)) + " ms";
      const via = (p) => p.connection === "relayed" && p.relay ? ` via ${esc(p.relay)}` : "";
      const rows = s.party.peers.map((p) => `<tr><td>${esc(p.name)}</td><td>${esc(p.virtual_ip)}</td><td>${esc(p.connection)}${via(p)}</td><td>${ms(p.latency_ms)}</td><td>${p.id === s.party.host_id ? "host" : ""}</td></tr>`).join("");
      $("#party").innerHTML = `<b>${esc(s.party.name)}</b> <code>${esc(s.party.id)}</code><table>${rows}</table>`;
    } else {
      $("#party").textContent = s.joining ? `joining ${s.joining}…` : "not in a party";
    }
    const ps = await call("GET", "/parties");
    $("#parties tbody").innerHTML = ps.map((p) => `<tr><td><code>${esc(p.id)}</code></td><td>${esc(p.name)}</td><td>${esc(p.host)}</td><td>${esc(p.members)}</td><td>${p.protected ? "🔒" : ""}</td><td>${esc(p.source)}</td></tr>`).join("");
  } catch (e) { $("#err").textContent = e.message; }
}

async function act(path, data) {
  try {
    await call("POST", path, data);
    $("#err").textContent = "";
  } catch (e) {
    $("#err").textContent = e instanceof NeedsLogin ? "Not logged in (see above)." : e.message;
  }
  refresh();
}

function form(id, path) {
  $(id).addEventListener("submit", (ev) => {
    ev.preventDefault();
    const data = Object.fromEntries(new FormData(ev.target));
    if (!data.password) delete data.password;
    act(path, data);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  form("#create", "/party/create");
  form("#join", "/party/join");
  $("#leave").addEventListener("click", () => act("/party/leave"));
  checkSession();
  refresh();
  setInterval(refresh, 2000);
});
