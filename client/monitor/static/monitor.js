// swarmlm monitor: polls /api/status and draws, per model, the block coverage map and the node table.
// Everything peers announced is inserted with textContent (never as HTML): records come from anyone.
"use strict";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value;
    else if (name.startsWith("data-")) node.setAttribute(name, String(value));
    else if (name === "title") node.title = String(value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child == null ? "" : String(child)));
  }
  return node;
}

function ago(seconds) {
  if (seconds < 1) return "just now";
  if (seconds < 90) return Math.round(seconds) + " s ago";
  return Math.round(seconds / 60) + " min ago";
}

function cacheText(n) {
  if (n.cache_tokens == null) return "?";
  const used = n.cache_tokens - n.cache_tokens_free;
  const pct = n.cache_tokens ? Math.round((100 * used) / n.cache_tokens) : 0;
  return used + " / " + n.cache_tokens + " tokens (" + pct + "%)";
}

function coverageTable(model) {
  const head = el("tr", {}, el("th", {}, "block"));
  for (const b of model.coverage) head.append(el("th", {}, b.block));
  const rows = [head];
  for (const n of model.nodes) {
    const row = el("tr", {"class": "map-node", "data-ref": n.ref}, el("th", {"title": n.peer_id}, n.address));
    for (const b of model.coverage) {
      const inside = n.start <= b.block && b.block < n.end;
      row.append(el("td", {"class": inside ? "cell " + n.state : "cell empty", "title": inside ? n.state : ""}));
    }
    rows.push(row);
  }
  const total = el("tr", {"class": "map-total"}, el("th", {}, "coverage"));
  for (const b of model.coverage) {
    total.append(el("td", {"class": "cell " + b.state, "data-block": b.block, "data-state": b.state,
                           "title": b.state + " (" + b.nodes.length + " nodes)"}, b.state === "gap" ? "!" : ""));
  }
  rows.push(total);
  return el("table", {"class": "coverage"}, ...rows);
}

const COLUMNS = ["node", "address", "blocks", "state", "throughput", "round trip", "cache", "version", "dtype",
                 "quantized", "TLS", "adapters", "last heartbeat", "record expires"];

function nodeRow(n, now) {
  const state = el("td", {"class": "state"}, el("span", {"class": "chip " + n.state}, n.state));
  if (n.error) state.append(el("div", {"class": "error"}, n.error));
  return el("tr", {"class": "node", "data-ref": n.ref, "data-address": n.address, "data-state": n.state},
    el("td", {"title": n.peer_id}, n.peer_id.slice(0, 12) + "\u2026"),
    el("td", {}, n.address),
    el("td", {}, n.start + ":" + n.end),
    state,
    el("td", {}, n.throughput.toFixed(0) + " tok/s"),
    el("td", {}, n.rtt_ms == null ? "-" : n.rtt_ms.toFixed(1) + " ms"),
    el("td", {}, cacheText(n)),
    el("td", {}, n.version),
    el("td", {}, n.dtype),
    el("td", {}, n.quantization === "none" ? "no" : n.quantization),
    el("td", {}, n.tls ? "yes" : "no"),
    el("td", {}, n.adapters.length ? n.adapters.join(", ") : "-"),
    el("td", {}, ago(now - n.last_heartbeat)),
    el("td", {}, n.expires_in > 0 ? "in " + Math.round(n.expires_in) + " s" : "expired"));
}

function modelSection(model, now) {
  const gaps = model.gaps.length ? "gaps at blocks " + model.gaps.join(", ") : "every block covered";
  const summary = el("p", {"class": model.gaps.length ? "summary bad" : "summary good"},
                     model.num_blocks + " blocks, " + model.nodes.length + " nodes: " + gaps);
  const head = el("tr", {}, ...COLUMNS.map((c) => el("th", {}, c)));
  const nodes = el("table", {"class": "nodes"}, el("thead", {}, head),
                   el("tbody", {}, ...model.nodes.map((n) => nodeRow(n, now))));
  const section = el("section", {"class": "model", "data-key": model.key},
                     el("h2", {}, model.name, " ", el("small", {}, model.key)), summary, coverageTable(model), nodes);
  if (model.nodes_not_shown) section.append(el("p", {"class": "error"}, model.nodes_not_shown + " more records not shown"));
  return section;
}

function render(status) {
  const now = Date.now() / 1000;
  const main = document.getElementById("models");
  main.replaceChildren(...status.models.map((m) => modelSection(m, now)));
  const updated = document.getElementById("updated");
  if (status.time == null) {
    updated.textContent = "waiting for the first look at the swarm\u2026";
    updated.dataset.state = "loading";
  } else {
    updated.textContent = "updated " + new Date(status.time * 1000).toLocaleTimeString() +
      (status.error ? " \u2014 " + status.error : "");
    updated.dataset.state = status.error ? "error" : "ok";
  }
}

async function poll() {
  let period = 2;
  try {
    const response = await fetch("/api/status", {cache: "no-store"});
    if (!response.ok) throw new Error("HTTP " + response.status);
    const status = await response.json();
    period = Math.max(1, status.refresh_seconds || 2);
    render(status);
  } catch (e) {
    const updated = document.getElementById("updated");
    updated.textContent = "monitor unreachable: " + e.message;
    updated.dataset.state = "error";
  }
  setTimeout(poll, period * 1000);
}

poll();
