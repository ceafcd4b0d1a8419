// The status page: polls /api/status every second and redraws. Node ids, addresses and
// reasons come from untrusted workers: every value goes in as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "consortium-api-key";

function el(tag, text, attrs = {}) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function row(cells, attrs = {}) {
  const tr = el("tr", undefined, attrs);
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
  return tr;
}

const heartbeat = (n) =>
  n.local ? "in process" : n.alive ? `${n.heartbeat_age_s.toFixed(1)} s` : `${n.heartbeat_age_s.toFixed(0)} s (none)`;
const layers = (r) => (r ? `${r[0]}-${r[1]}` : "—");
const short = (id) => (id && id.length > 16 ? id.slice(0, 12) + "…" : id);

function coverage(st) {
  const bar = $("coverage");
  bar.replaceChildren();
  st.coverage.forEach((holders, i) => {
    const d = el("div", holders.length, { title: `layer ${i}: ${holders.join(", ") || "nobody"}` });
    d.className = "h" + Math.min(holders.length, 2);
    bar.appendChild(d);
  });
  $("coverage-note").textContent = `${st.model.n_layers} layers; fewest holders of a layer: ${st.min_holders}`;
  const ranges = $("ranges");
  ranges.replaceChildren();
  for (const n of st.nodes.filter((n) => n.layers)) {
    const track = el("div", undefined, { class: "track" });
    const span = el("div", undefined, { class: "span " + n.role, title: `${n.node_id} ${layers(n.layers)} (${n.role})` });
    span.style.left = (100 * n.layers[0]) / st.model.n_layers + "%";
    span.style.width = (100 * (n.layers[1] - n.layers[0])) / st.model.n_layers + "%";
    track.appendChild(span);
    const r = el("div", undefined, { class: "row" });
    r.append(el("span", n.node_id, { class: "label" }), track);
    ranges.appendChild(r);
  }
  $("route").textContent = st.route.length
    ? "pipeline: " + st.route.map((r) => `${r.node_id} ${layers(r.layers)}`).join(" → ")
    : "no complete pipeline: " + (st.placement_error || "?");
}

function nodes(st) {
  const body = $("nodes").tBodies[0];
  body.replaceChildren(
    ...st.nodes.map((n) =>
      row(
        [
          el("td", short(n.node_id) + (n.local && n.node_id !== "coordinator" ? " (coordinator)" : ""), {
            title: `${n.node_id} ${n.address}`,
          }),
          el("td", n.fingerprint || "—", { class: "mono" }),
          el("td", n.role, { class: "role" }),
          layers(n.layers),
          `${n.device} / ${n.dtype}`,
          el("td", heartbeat(n), { class: "num" }),
          el("td", n.step_ms ?? "—", { class: "num" }),
          el("td", `${n.audits_passed} / ${n.audits_failed}`, { class: "num" }),
          el("td", n.banned ? `yes: ${n.ban_reason || ""}` : "no"),
        ],
        { "data-node": n.node_id, "data-role": n.role },
      ),
    ),
  );
}

function sessions(st) {
  $("sessions").tBodies[0].replaceChildren(
    ...st.sessions.map((s) =>
      row(
        [
          el("td", s.session_id.slice(0, 12), { class: "mono", title: s.session_id }),
          s.state,
          el("td", `${s.tokens} / ${s.max_tokens}`, { class: "num" }),
          el("td", s.prompt_tokens, { class: "num" }),
          el("td", s.ttft_ms, { class: "num" }),
          el("td", s.tokens_per_second, { class: "num" }),
          el("td", s.audits, { class: "num" }),
          el("td", s.age_s, { class: "num" }),
        ],
        { "data-session": s.session_id },
      ),
    ),
  );
}

function describe(ev) {
  const d = ev.detail || {};
  if (ev.kind === "failover")
    return `failover: stage ${d.stage} ${d.failed_node} → ${d.backup_node} at token ${d.token_index} (${Math.round(d.latency_ms)} ms)`;
  if (ev.kind === "rollback")
    return `rollback: stage ${d.stage} to position ${d.position}, ${d.node} caught (${d.reason}); now on ${d.new_node}`;
  if (ev.kind === "ban") return `ban: ${d.node} (${d.reason})`;
  if (ev.kind === "auditor_lost") return `auditor lost: ${d.node} (stage ${d.stage})`;
  return `${ev.kind}: ${JSON.stringify(d)}`;
}

function feed(st) {
  $("feed").replaceChildren(
    ...st.feed.map((ev) => {
      const li = el("li", `${new Date(ev.time * 1000).toLocaleTimeString()} ${describe(ev)}`, { "data-kind": ev.kind });
      if (ev.session_id) li.title = `session ${ev.session_id}`;
      return li;
    }),
  );
  if (!st.feed.length) $("feed").appendChild(el("li", "nothing yet", { class: "muted" }));
}

function verification(st) {
  const v = st.verification;
  const t = v.tolerances || {};
  const fmt = (x) => (x ? `rel-L2 ≤ ${(+x.rel_l2).toPrecision(3)}, max/RMS ≤ ${(+x.max_rel).toPrecision(3)}` : "—");
  const items = [
    ["release", v.release],
    ["audited share", v.audit_probability],
    ["re-checked passes", v.audit_recheck_probability],
    ["audit workers", v.audit_workers],
    ["strict class", fmt(t.strict)],
    ["loose class", fmt(t.loose)],
    ["node timeout", `${v.node_timeout_s} s`],
    ["hang after", `${v.hang_after_s} s`],
    ["coordinator backup", v.backup ? "on" : "off"],
  ];
  $("verification").replaceChildren(...items.flatMap(([k, val]) => [el("dt", k), el("dd", val)]));
}

async function poll() {
  const key = localStorage.getItem(KEY);
  try {
    const r = await fetch("/api/status", { headers: key ? { Authorization: "Bearer " + key } : {} });
    if (r.status === 401) {
      $("keyform").hidden = false;
      throw new Error("this server needs an API key");
    }
    if (!r.ok) throw new Error(`/api/status answered ${r.status}`);
    const st = await r.json();
    $("error").hidden = true;
    $("model").textContent = `${st.model.name} · sha256 ${st.model.digest.slice(0, 12)}…`;
    coverage(st);
    nodes(st);
    sessions(st);
    feed(st);
    verification(st);
    $("updated").textContent = "updated " + new Date(st.time * 1000).toLocaleTimeString();
    document.body.dataset.updated = String(st.time);
  } catch (e) {
    $("error").textContent = String(e.message || e);
    $("error").hidden = false;
  }
}

$("keyform").addEventListener("submit", (e) => {
  e.preventDefault();
  localStorage.setItem(KEY, $("key").value.trim());
  $("keyform").hidden = true;
  poll();
});

poll();
setInterval(poll, 1000);
