// agent-swarm dashboard: jobs list, live job view (DAG, timeline with critical path, node panel),
// training curves. Vanilla JS + SVG, no build step, no network access beyond this server.
// Untrusted text (prompts, tool output, answers) only ever reaches the DOM through textContent.
"use strict";

const $ = (id) => document.getElementById(id);
const SVGNS = "http://www.w3.org/2000/svg";
const TERMINAL = new Set(["succeeded", "failed", "cancelled", "interrupted"]);
const ORCH = "orchestrator";

function h(tag, attrs, text) {
  const e = document.createElement(tag);
  if (attrs) for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
function s(tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  if (attrs) for (const k in attrs) e.setAttribute(k, attrs[k]);
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const fmtInt = (n) => (n || 0).toLocaleString("en-US");
function fmtDur(sec) {
  if (sec == null || !isFinite(sec)) return "–";
  if (sec < 10) return sec.toFixed(1) + " s";
  if (sec < 120) return Math.round(sec) + " s";
  if (sec < 7200) return Math.floor(sec / 60) + " m " + String(Math.round(sec % 60)).padStart(2, "0") + " s";
  return (sec / 3600).toFixed(1) + " h";
}
const clip = (t, n) => (t && t.length > n ? t.slice(0, n - 1) + "…" : t || "");

// ---- instrumentation (read by bench/dashboard_latency.py and the browser tests) ----------------
const perf = {
  latencies: [],  // ms from an event's ts to the start of the frame after the one that applied it
  received: [],   // ms from an event's ts to its arrival in the page (server + network share)
  batches: [],    // {n, applyMs, at}
  frames: [],     // frame-to-frame ms while a job streams
  longTasks: [],  // durations of main-thread tasks > 50 ms
  flushes: 0,
  parts: [],      // [dag ms, timeline ms] per flush
  reset() { this.parts = []; this.latencies = []; this.received = []; this.batches = []; this.frames = []; this.longTasks = []; this.flushes = 0; },
};
window.__dash = { perf };
try {
  new PerformanceObserver((list) => { for (const e of list.getEntries()) perf.longTasks.push(e.duration); })
    .observe({ type: "longtask", buffered: true });
} catch (_) { /* not every browser reports long tasks */ }

// ---- auth and API ------------------------------------------------------------------------------
const TOKEN_KEY = "swarm.token";
const token = () => localStorage.getItem(TOKEN_KEY) || "";
function authHeaders(extra) {
  const hd = Object.assign({}, extra || {});
  if (token()) hd.Authorization = "Bearer " + token();
  return hd;
}
function banner(msg) {
  const b = $("banner");
  b.hidden = !msg;
  b.textContent = msg || "";
}
async function api(path, opts) {
  opts = opts || {};
  const res = await fetch(path, Object.assign({}, opts, { headers: authHeaders(opts.headers) }));
  if (res.status === 401) {
    banner("The server needs an API token: enter it in the field at the top right.");
    $("token").focus();
    throw new Error("unauthorized");
  }
  let body = null;
  try { body = await res.json(); } catch (_) { /* not JSON */ }
  if (!res.ok) {
    const detail = body && body.detail ? body.detail : res.status + " " + res.statusText;
    const err = new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
    err.status = res.status;
    throw err;
  }
  return body;
}

$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  const v = $("token").value.trim();
  if (v) localStorage.setItem(TOKEN_KEY, v); else localStorage.removeItem(TOKEN_KEY);
  $("token").value = "";
  showAuthState();
  banner("");
  route();
});
function showAuthState() { $("auth-state").textContent = token() ? "token saved" : ""; }

// ---- router ------------------------------------------------------------------------------------
let current = null;  // the active view's controller: {stop()}
function route() {
  const hash = location.hash || "#/jobs";
  if (current) current.stop();
  current = null;
  for (const v of document.querySelectorAll(".view")) v.hidden = true;
  let m;
  if ((m = hash.match(/^#\/jobs\/([^/]+)$/))) current = openJob(decodeURIComponent(m[1]));
  else if (hash.startsWith("#/training")) current = openTraining();
  else current = openJobs();
  for (const a of document.querySelectorAll("[data-nav]"))
    a.classList.toggle("active", hash.startsWith("#/" + a.dataset.nav));
}
window.addEventListener("hashchange", route);

// ================================================================================================
// Jobs list
// ================================================================================================
function openJobs() {
  $("view-jobs").hidden = false;
  let stopped = false, timer = null;
  async function load() {
    if (stopped) return;
    try {
      const st = $("state-filter").value;
      const out = await api("/jobs?limit=200" + (st ? "&state=" + encodeURIComponent(st) : ""));
      renderJobs(out);
      banner("");
    } catch (e) {
      if (e.message !== "unauthorized") banner("Cannot list jobs: " + e.message);
    }
    if (!stopped) timer = setTimeout(load, document.hidden ? 5000 : 2000);
  }
  const onFilter = () => { clearTimeout(timer); load(); };
  $("state-filter").addEventListener("change", onFilter);
  load();
  return { stop() { stopped = true; clearTimeout(timer); $("state-filter").removeEventListener("change", onFilter); } };
}

function renderJobs(out) {
  const now = Date.now() / 1000;
  const body = $("jobs-body");
  const frag = document.createDocumentFragment();
  for (const j of out.jobs) {
    const m = j.metrics || {};
    const tr = h("tr", { "data-id": j.id, "data-state": j.state, tabindex: "0" });
    const name = h("td");
    name.appendChild(h("div", { class: "jname" }, j.name || "(unnamed)"));
    name.appendChild(h("div", { class: "muted small mono" }, j.id));
    tr.appendChild(name);
    const st = h("td");
    st.appendChild(h("span", { class: "badge js-" + j.state }, j.state));
    tr.appendChild(st);
    tr.appendChild(h("td", null, fmtDur(now - j.created_at) + " ago"));
    const wall = j.state === "running" && j.started_at ? now - j.started_at : m.wall_time_s;
    const cells = [m.subagents, m.tool_calls, (m.prompt_tokens || 0) + (m.completion_tokens || 0), m.critical_steps, m.total_steps];
    for (const c of cells) tr.appendChild(h("td", { class: "num" }, fmtInt(c)));
    tr.appendChild(h("td", { class: "num" }, fmtDur(wall)));
    tr.addEventListener("click", () => { location.hash = "#/jobs/" + encodeURIComponent(j.id); });
    tr.addEventListener("keydown", (e) => { if (e.key === "Enter") location.hash = "#/jobs/" + encodeURIComponent(j.id); });
    frag.appendChild(tr);
  }
  if (!out.jobs.length) frag.appendChild(h("tr")).appendChild(h("td", { colspan: "9", class: "muted" }, "No jobs yet."));
  body.replaceChildren(frag);
  $("jobs-count").textContent = out.total + " job" + (out.total === 1 ? "" : "s");
}

$("new-job-toggle").addEventListener("click", () => { $("new-job").hidden = !$("new-job").hidden; });
$("new-job").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("new-job-error").textContent = "";
  let spec;
  try { spec = JSON.parse($("new-job-spec").value); } catch (err) {
    $("new-job-error").textContent = "The spec is not valid JSON: " + err.message;
    return;
  }
  try {
    const out = await api("/jobs", { method: "POST", body: JSON.stringify(spec), headers: { "Content-Type": "application/json" } });
    location.hash = "#/jobs/" + encodeURIComponent(out.id);
  } catch (err) {
    $("new-job-error").textContent = err.message;
  }
});

// ================================================================================================
// Job model: folds the event stream into agents, attempts, steps and tool calls
// ================================================================================================
class JobModel {
  constructor(id) {
    this.id = id;
    this.lastSeq = 0;
    this.state = "queued";
    this.name = "";
    this.t0 = null;      // job start (s)
    this.tEnd = null;    // job end (s)
    this.result = null;
    this.error = null;
    this.metrics = null; // from job_finished: authoritative
    this.agents = new Map();
    this.order = [];     // agent ids in creation order, orchestrator first
    this.toolCalls = 0;
    this.tokens = 0;
    this.layoutDirty = true;
    this.touched = new Set();
    this.finished = false;
    this.agent(ORCH).name = "orchestrator";
  }
  agent(id) {
    let a = this.agents.get(id);
    if (!a) {
      a = { id, name: id, stage: id === ORCH ? 0 : 1, depends_on: [], system_prompt: "", task: "", tools: [],
            state: "pending", created: null, attempts: [], steps: [], stepIndex: new Map(), calls: new Map(),
            nsteps: 0, ntools: 0, result: null, error: null, retries: [] };
      this.agents.set(id, a);
      this.order.push(id);
      this.layoutDirty = true;
    }
    return a;
  }
  stepOf(a, step, ts) {
    const attempt = Math.max(1, a.attempts.length);
    const key = attempt + ":" + step;
    let st = a.stepIndex.get(key);
    if (!st) {
      st = { attempt, step, ts, content: null, reasoning: null, pt: 0, ct: 0, calls: [] };
      a.stepIndex.set(key, st);
      a.steps.push(st);
    }
    return st;
  }
  closeAttempt(a, ts, outcome) {
    const at = a.attempts[a.attempts.length - 1];
    if (at && at.end == null) { at.end = ts; at.outcome = outcome; }
  }
  apply(ev) {
    if (ev.seq <= this.lastSeq) return;  // replays after a reconnect never double-count
    this.lastSeq = ev.seq;
    const ts = ev.ts;
    if (this.t0 == null) this.t0 = ts;
    const a = ev.agent_id ? this.agent(ev.agent_id) : null;
    if (a) this.touched.add(a.id);
    switch (ev.type) {
      case "job_submitted":
        this.name = ev.name; this.mode = ev.mode; this.t0 = ts; break;
      case "job_started": {
        this.state = "running"; this.t0 = ts;
        const o = this.agent(ORCH);
        if (o.state === "pending") { o.state = "running"; o.attempts.push({ start: ts, end: null }); this.touched.add(ORCH); }
        break;
      }
      case "subagent_created":
        Object.assign(a, { name: ev.name || ev.agent_id, stage: ev.stage, depends_on: ev.depends_on || [],
                           system_prompt: ev.system_prompt, task: ev.task, tools: ev.tools || [], created: ts });
        // A copy of a fan-out node: the node waits for it, so draw the copy as its dependency.
        if (ev.fan_out_of && !this.agent(ev.fan_out_of).depends_on.includes(ev.agent_id)) {
          this.agent(ev.fan_out_of).depends_on = [...this.agent(ev.fan_out_of).depends_on, ev.agent_id];
        }
        this.layoutDirty = true;
        break;
      case "subagent_started":
        if (a.id === ORCH && a.attempts.length) break;  // the job's start already opened its bar
        a.state = "running"; a.attempts.push({ start: ts, end: null, worker: ev.worker, attempt: ev.attempt });
        break;
      case "subagent_step": {
        const st = this.stepOf(a, ev.step, ts);
        st.content = ev.content; st.reasoning = ev.reasoning; st.pt = ev.prompt_tokens; st.ct = ev.completion_tokens;
        a.nsteps += 1;
        this.tokens += (ev.prompt_tokens || 0) + (ev.completion_tokens || 0);
        break;
      }
      case "tool_call": {
        const c = { id: ev.call_id, tool: ev.tool, args: ev.arguments, ts, end: null, result: null, is_error: false };
        this.stepOf(a, ev.step, ts).calls.push(c);
        a.calls.set(ev.call_id, c);
        a.ntools += 1;
        this.toolCalls += 1;
        break;
      }
      case "tool_result": {
        const c = a.calls.get(ev.call_id);
        if (c) { c.end = ts; c.result = ev.content; c.is_error = ev.is_error; c.duration = ev.duration_s; }
        break;
      }
      case "subagent_finished":
        a.state = "done"; a.result = ev.result; this.closeAttempt(a, ts, "done"); break;
      case "subagent_failed":
        a.error = ev.error; a.state = ev.will_retry ? "retried" : "failed"; this.closeAttempt(a, ts, "failed");
        if (!a.attempts.length) a.attempts.push({ start: ts, end: ts, outcome: "failed" });
        break;
      case "subagent_retried":
        a.state = "retried"; a.retries.push({ attempt: ev.attempt, reason: ev.reason, delay: ev.delay_s }); break;
      case "subagent_cancelled":
        a.state = "cancelled"; this.closeAttempt(a, ts, "cancelled"); break;
      case "job_finished":
        this.finish(ev.state, ts, ev.result, ev.error, ev.metrics);
        break;
    }
  }
  // The job's end: from its job_finished event, or from its status when the service ended it
  // without one (e.g. `interrupted` after its actor was lost).
  finish(state, ts, result, error, metrics) {
    this.state = state; this.tEnd = ts; this.result = result; this.error = error; this.metrics = metrics;
    this.finished = true;
    if (this.t0 == null) this.t0 = ts;
    const o = this.agent(ORCH);
    const os = state === "succeeded" ? "done" : state === "failed" ? "failed" : "cancelled";
    if (o.state === "running" || o.state === "pending") o.state = os;
    this.closeAttempt(o, ts, os);
    if (!o.attempts.length) o.attempts.push({ start: this.t0, end: ts, outcome: os });
    for (const x of this.agents.values()) {
      if (x.state === "running" || x.state === "pending" || x.state === "retried") {
        x.state = state === "cancelled" ? "cancelled" : x.state === "pending" ? "cancelled" : "failed";
        this.closeAttempt(x, ts, x.state);
        this.touched.add(x.id);
      }
    }
    this.touched.add(ORCH);
  }
  // CriticalSteps and its chain, with swarm/critical_steps.py's definition (docs/critical_steps.md):
  // orchestrator steps + per stage the heaviest same-stage dependency chain; ties to the smaller id.
  critical() {
    const orch = this.agents.get(ORCH).nsteps;
    const stages = new Map();
    for (const a of this.agents.values()) {
      if (a.id === ORCH) continue;
      if (!stages.has(a.stage)) stages.set(a.stage, []);
      stages.get(a.stage).push(a);
    }
    let total = orch;
    const chain = [];
    for (const stage of [...stages.keys()].sort((x, y) => x - y)) {
      const members = stages.get(stage);
      const inStage = new Map(members.map((a) => [a.id, a]));
      const best = new Map(), prev = new Map();
      const order = topo(members, inStage);
      for (const a of order) {
        let pb = 0, p = null;
        for (const d of [...a.depends_on].filter((d) => inStage.has(d)).sort(cmpStr)) {
          if (!best.has(d)) continue;
          if (p === null || best.get(d) > pb) { pb = best.get(d); p = d; }
        }
        best.set(a.id, pb + a.nsteps);
        prev.set(a.id, p);
      }
      let end = null;
      for (const [id, b] of best) if (end === null || b > best.get(end) || (b === best.get(end) && cmpStr(id, end) < 0)) end = id;
      if (end === null) continue;
      const L = best.get(end);
      total += L;
      if (L > 0) {
        const path = [];
        for (let c = end; c !== null; c = prev.get(c)) path.push(c);
        chain.push(...path.reverse());
      }
    }
    const totalSteps = [...this.agents.values()].reduce((n, a) => n + a.nsteps, 0);
    return { critical: total, total: totalSteps, chain };
  }
}
const cmpStr = (x, y) => (x < y ? -1 : x > y ? 1 : 0);
function topo(members, inStage) {
  const indeg = new Map(members.map((a) => [a.id, 0]));
  const kids = new Map(members.map((a) => [a.id, []]));
  for (const a of members) for (const d of a.depends_on) if (inStage.has(d)) { indeg.set(a.id, indeg.get(a.id) + 1); kids.get(d).push(a.id); }
  const ready = members.filter((a) => indeg.get(a.id) === 0).map((a) => a.id).sort(cmpStr);
  const out = [];
  while (ready.length) {
    const id = ready.shift();
    out.push(inStage.get(id));
    for (const k of kids.get(id)) { indeg.set(k, indeg.get(k) - 1); if (indeg.get(k) === 0) { ready.push(k); ready.sort(cmpStr); } }
  }
  return out;  // a cycle (impossible for a validated DAG) just leaves its members out
}

// ================================================================================================
// Job view
// ================================================================================================
const STATES = ["pending", "running", "done", "failed", "retried", "cancelled"];

// One icon shape per state, so states differ by shape as well as colour.
function stateIcon(state) {
  const g = s("g", { class: "icon" });
  switch (state) {
    case "pending": g.appendChild(s("circle", { r: 5, class: "i-hollow" })); break;
    case "running": g.appendChild(s("path", { d: "M-4,-5 L5,0 L-4,5 Z", class: "i-fill" })); break;
    case "done":
      g.appendChild(s("circle", { r: 6, class: "i-fill" }));
      g.appendChild(s("path", { d: "M-3,0 L-1,2.5 L3.5,-2.5", class: "i-mark" })); break;
    case "failed":
      g.appendChild(s("path", { d: "M0,-6.5 L6.5,0 L0,6.5 L-6.5,0 Z", class: "i-fill" }));
      g.appendChild(s("path", { d: "M-2.2,-2.2 L2.2,2.2 M2.2,-2.2 L-2.2,2.2", class: "i-mark" })); break;
    case "retried":
      g.appendChild(s("circle", { r: 6, class: "i-fill" }));
      g.appendChild(s("path", { d: "M2.8,-1.5 A3,3 0 1 0 3,1.2 M3.2,-3.6 L2.8,-1.3 L0.6,-1.8", class: "i-mark" })); break;
    case "cancelled": g.appendChild(s("rect", { x: -5, y: -5, width: 10, height: 10, class: "i-fill" })); break;
  }
  return g;
}

function renderLegend() {
  const lg = $("legend");
  lg.replaceChildren();
  for (const st of STATES) {
    const item = h("span", { class: "lg st-" + st });
    const svg = s("svg", { width: 16, height: 16, viewBox: "-8 -8 16 16" });
    svg.appendChild(stateIcon(st));
    item.appendChild(svg);
    item.appendChild(document.createTextNode(st));
    lg.appendChild(item);
  }
  const crit = h("span", { class: "lg" });
  crit.appendChild(h("span", { class: "crit-swatch" }));
  crit.appendChild(document.createTextNode("critical path"));
  lg.appendChild(crit);
}

function openJob(jobId) {
  $("view-job").hidden = false;
  $("panel").hidden = true;
  $("answer-card").hidden = true;
  $("job-title").textContent = jobId;
  renderLegend();
  const model = new JobModel(jobId);
  const ctl = { stopped: false, abort: new AbortController() };
  const view = { model, nodes: new Map(), rows: new Map(), running: [], T: 30, selected: null, crit: { chain: [], critical: 0, total: 0 } };
  window.__dash.model = model;
  window.__dash.view = view;
  perf.reset();

  // Incoming events wait here and are applied at most once per animation frame (coalescing), so a
  // burst of tool calls costs one layout and one paint instead of one per event.
  let queue = [], scheduled = false;
  function enqueue(ev) {
    perf.received.push(Date.now() - ev.ts * 1000);
    queue.push(ev);
    if (!scheduled) {
      scheduled = true;
      if (document.hidden) setTimeout(flush, 250);  // rAF does not run in background tabs
      else requestAnimationFrame(flush);
    }
  }
  function flush() {
    scheduled = false;
    if (ctl.stopped || !queue.length) return;
    const batch = queue; queue = [];
    const t = performance.now();
    for (const ev of batch) model.apply(ev);
    render(view);
    const applyMs = performance.now() - t;
    perf.flushes += 1;
    perf.batches.push({ n: batch.length, applyMs, at: Date.now() });
    // The paint of this frame follows the current task; measure to the start of the next frame.
    requestAnimationFrame(() => {
      const now = Date.now();
      for (const ev of batch) perf.latencies.push(now - ev.ts * 1000);
    });
  }

  // Per-frame work: running bars grow, wall time ticks; frame times recorded while live.
  let lastFrame = null;
  function tick(ts) {
    if (ctl.stopped) return;
    if (lastFrame !== null && !model.finished) perf.frames.push(ts - lastFrame);
    lastFrame = ts;
    animate(view);
    requestAnimationFrame(tick);
  }
  requestAnimationFrame(tick);

  // Status first (title, state), then the event stream; fetch-based so the token header is sent.
  api("/jobs/" + encodeURIComponent(jobId)).then((st) => {
    $("job-title").textContent = st.name ? st.name + " · " + st.id : st.id;
    if (model.state === "queued") { model.state = st.state; render(view); }
  }).catch((e) => { if (e.message !== "unauthorized") banner("Cannot load job: " + e.message); });
  streamEvents(model, ctl, enqueue, (st) => {
    // Let queued events land first, then close the job from its status.
    setTimeout(() => {
      if (ctl.stopped || model.finished) return;
      model.finish(st.state, st.finished_at || Date.now() / 1000, st.result, st.error,
                   st.state === "interrupted" ? null : st.metrics);  // an interrupted job's metrics were never reported
      render(view);
    }, 50);
  });

  const onCancel = async () => {
    const btn = $("cancel-job");
    btn.disabled = true;
    btn.textContent = "Cancelling…";
    try {
      await api("/jobs/" + encodeURIComponent(jobId) + "/cancel", { method: "POST" });
    } catch (e) {
      banner("Cancel failed: " + e.message);
      btn.textContent = "Cancel job";
      btn.disabled = TERMINAL.has(model.state);
    }
  };
  $("cancel-job").onclick = onCancel;
  $("cancel-job").textContent = "Cancel job";
  for (const b of document.querySelectorAll("[data-zoom]")) b.onclick = () => setZoom(view, b.dataset.zoom);
  document.onkeydown = (e) => { if (e.key === "Escape" && !$("panel").hidden) $("panel-close").onclick(); };
  $("panel-close").onclick = () => { view.selected = null; $("panel").hidden = true; render(view); };
  const onResize = () => { model.layoutDirty = true; view.ganttFull = true; view.ganttWidth = 0; render(view); };
  window.addEventListener("resize", onResize);
  render(view);
  return {
    stop() {
      ctl.stopped = true;
      ctl.abort.abort();
      window.removeEventListener("resize", onResize);
    },
  };
}

async function streamEvents(model, ctl, enqueue, onEnd) {
  let backoff = 500, ended = false, seen = model.lastSeq, progressed = true;
  const state = $("stream-state");
  while (!ctl.stopped) {
    try {
      state.textContent = seen ? "reconnecting…" : "connecting…";
      const res = await fetch("/jobs/" + encodeURIComponent(model.id) + "/events?after=" + seen, {
        headers: authHeaders({ Accept: "text/event-stream" }), signal: ctl.abort.signal, cache: "no-store",
      });
      if (res.status === 401) { banner("The server needs an API token: enter it at the top right."); await sleep(3000); continue; }
      if (res.status === 404) { banner("No job " + model.id); return; }
      if (!res.ok) throw new Error("HTTP " + res.status);
      state.textContent = "live";
      progressed = false;
      const reader = res.body.getReader();
      const dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += dec.decode(value, { stream: true });
        // Walk the frames with an index and cut the buffer once per chunk: slicing per frame would
        // copy the rest of a large replay chunk once for every event in it.
        let pos = 0, k;
        while ((k = buf.indexOf("\n\n", pos)) >= 0) {
          const frame = buf.slice(pos, k);
          pos = k + 2;
          let data = "";
          for (const line of frame.split("\n")) if (line.startsWith("data:")) data += line.slice(5).trim();
          if (!data) continue;  // keep-alive comment
          const ev = JSON.parse(data);
          if (ev.seq <= seen) continue;
          seen = ev.seq;
          if (ev.type === "job_finished") ended = true;  // applied a frame later; the stream is done now
          progressed = true;
          enqueue(ev);
        }
        buf = buf.slice(pos);
      }
      backoff = 500;
    } catch (e) {
      if (ctl.stopped) return;
    }
    if (ended || model.finished || ctl.stopped) { state.textContent = ctl.stopped ? "" : "job ended"; return; }
    // A stream that brought nothing new and no job_finished: the service may have ended the job
    // itself (interrupted, actor lost). Settle from its status rather than reconnect forever.
    if (!progressed) try {
      const st = await api("/jobs/" + encodeURIComponent(model.id));
      if (TERMINAL.has(st.state)) {
        onEnd(st);
        state.textContent = "job ended";
        return;
      }
    } catch (_) { /* the service may be restarting: retry below */ }
    // The stream ended early (server restart, network): resume after the last event applied.
    state.textContent = "disconnected; retrying…";
    await sleep(backoff);
    backoff = Math.min(backoff * 2, 5000);
  }
}

// ---- rendering -----------------------------------------------------------------------------
function render(view) {
  const m = view.model;
  const c = m.critical();
  view.crit = c;
  const critSet = new Set(c.chain);
  if (m.agents.get(ORCH).nsteps > 0) critSet.add(ORCH);  // plan mode without aggregation: no orchestrator step
  view.critSet = critSet;
  $("job-state").textContent = m.state;
  $("job-state").className = "badge js-" + m.state;
  const btn = $("cancel-job");
  if (TERMINAL.has(m.state)) { btn.disabled = true; btn.textContent = m.state === "cancelled" ? "Cancelled" : "Cancel job"; }
  else if (btn.textContent !== "Cancelling…") btn.disabled = false;
  renderCounters(view);
  const t0 = performance.now();
  renderDag(view);
  const t1 = performance.now();
  renderGantt(view);
  perf.parts.push([t1 - t0, performance.now() - t1]);
  if (view.selected && m.touched.has(view.selected)) renderPanel(view, view.selected);
  m.touched.clear();
  if (m.finished && !view.answerShown) {
    view.answerShown = true;
    const card = $("answer-card"), box = $("answer");
    card.hidden = false;
    box.replaceChildren();
    if (m.error) box.appendChild(h("p", { class: "error" }, m.error));
    if (m.result) box.appendChild(window.renderMarkdown(m.result));
    if (!m.error && !m.result) box.appendChild(h("p", { class: "muted" }, "(no answer)"));
  }
}

function setCounter(name, v) {
  const e = document.querySelector('[data-c="' + name + '"]');
  if (e.textContent !== v) e.textContent = v;
}
function renderCounters(view) {
  const m = view.model, c = view.crit;
  // A finished job's own metrics are authoritative; while it runs, count from the events.
  const crit = m.metrics ? m.metrics.critical_steps : c.critical;
  const total = m.metrics ? m.metrics.total_steps : c.total;
  setCounter("critical", fmtInt(crit));
  setCounter("total", fmtInt(total));
  setCounter("speedup", crit > 0 ? (total / crit).toFixed(2) + "×" : "–");
  setCounter("agents", fmtInt(m.agents.size - 1));
  let running = 0;
  for (const a of m.agents.values()) if (a.state === "running" && a.id !== ORCH) running++;
  setCounter("running", fmtInt(running));
  setCounter("tools", fmtInt(m.toolCalls));
  setCounter("tokens", fmtInt(m.tokens));
}

// ---- DAG: a layered layout. Columns are stages (a stage with same-stage dependencies gets one
// column per dependency depth); a tall column wraps into several so 100 nodes stay legible.
const NODE_W = 132, NODE_H = 24, COL_GAP = 46, SUB_GAP = 12, ROW_GAP = 6, PAD = 14, HEAD = 22;

function layoutDag(view) {
  const m = view.model;
  const agents = m.order.map((id) => m.agents.get(id)).filter((a) => a.id !== ORCH);
  const depth = new Map();
  const byId = m.agents;
  function d(a, guard) {
    if (depth.has(a.id)) return depth.get(a.id);
    if (guard > 200) return 0;
    let v = 0;
    for (const dep of a.depends_on) {
      const b = byId.get(dep);
      if (b && b.stage === a.stage && b.id !== a.id) v = Math.max(v, d(b, guard + 1) + 1);
    }
    depth.set(a.id, v);
    return v;
  }
  const layers = new Map();  // stage*1000+depth -> ids
  for (const a of agents) {
    const key = a.stage * 1000 + d(a, 0);
    if (!layers.has(key)) layers.set(key, []);
    layers.get(key).push(a.id);
  }
  const n = agents.length;
  const maxRows = Math.max(12, Math.ceil(Math.sqrt(n) * 1.6));
  // A layer (one stage, one dependency depth) is a group of columns: a tall one wraps, with a small
  // gap between its columns and a wide gap between layers, so wrapping never reads as a dependency.
  const groups = [{ stage: 0, depth: 0, cols: [[ORCH]] }];
  for (const key of [...layers.keys()].sort((x, y) => x - y)) {
    const ids = layers.get(key);
    const k = ids.length <= maxRows ? 1 : Math.ceil(ids.length / maxRows);
    const per = Math.ceil(ids.length / k);
    const cols = [];
    for (let i = 0; i < k; i++) cols.push(ids.slice(i * per, (i + 1) * per));
    groups.push({ stage: Math.floor(key / 1000), depth: key % 1000, cols });
  }
  const tallest = Math.max(...groups.flatMap((g) => g.cols.map((c) => c.length)));
  const height = PAD * 2 + HEAD + tallest * (NODE_H + ROW_GAP);
  const pos = new Map();
  let x = PAD;
  for (const g of groups) {
    g.x0 = x;
    for (const ids of g.cols) {
      const y0 = PAD + HEAD + ((tallest - ids.length) * (NODE_H + ROW_GAP)) / 2;
      ids.forEach((id, ri) => pos.set(id, { x, y: y0 + ri * (NODE_H + ROW_GAP), group: g }));
      x += NODE_W + SUB_GAP;
    }
    g.x1 = x - SUB_GAP;
    x += COL_GAP - SUB_GAP;
  }
  return { pos, groups, width: x - COL_GAP + PAD, height };
}

// Zoom scales the drawing's displayed size (its viewBox stays), "fit" fits the pane's width.
function applyZoom(view) {
  const L = view.layout, svg = $("dag");
  if (!L) return;
  let z = view.zoom || 1;
  if (view.zoom === "fit") z = Math.min(1.5, ($("dag-wrap").clientWidth - 4) / L.width);
  svg.setAttribute("width", Math.round(L.width * z));
  svg.setAttribute("height", Math.round(L.height * z));
}
function setZoom(view, how) {
  const cur = view.zoom === "fit" ? Number($("dag").getAttribute("width")) / view.layout.width : view.zoom || 1;
  view.zoom = how === "fit" ? "fit" : Math.max(0.3, Math.min(3, cur * (how === "in" ? 1.25 : 0.8)));
  applyZoom(view);
}

function renderDag(view) {
  const m = view.model, svg = $("dag");
  if (m.layoutDirty) {
    m.layoutDirty = false;
    const L = (view.layout = layoutDag(view));
    svg.setAttribute("viewBox", "0 0 " + L.width + " " + L.height);
    applyZoom(view);
    svg.replaceChildren();
    const labels = s("g", { class: "stage-labels" });
    let lastStage = -1;
    for (const g of L.groups) {
      if (g.stage > 0) labels.appendChild(s("rect", { x: g.x0 - 5, y: PAD + HEAD - 6, width: g.x1 - g.x0 + 10, height: L.height - PAD * 2 - HEAD + 6, rx: 6, class: "band" }));
      // Within a stage, level k+1 holds the agents that wait on level k (same-stage dependencies).
      const title = g.stage === 0 ? "orchestrator" : "stage " + g.stage + (g.depth === 0 ? "" : " · level " + (g.depth + 1));
      labels.appendChild(s("text", { x: g.x0, y: PAD + 6 }, title));
      lastStage = g.stage;
    }
    svg.appendChild(labels);
    const edges = s("g", { class: "edges" });
    view.edgeEls = [];
    const curve = (x1, y1, x2, y2, cls, src, dst) => {
      const mx = (x1 + x2) / 2;
      const path = s("path", { d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`, class: cls });
      path.dataset.src = src; path.dataset.dst = dst;
      edges.appendChild(path);
      view.edgeEls.push(path);
    };
    // The orchestrator spawns whole layers: one edge per spawned band, not one per node.
    const o = L.pos.get(ORCH);
    for (const g of L.groups) {
      if (g.stage === 0 || g.depth !== 0) continue;
      curve(o.x + NODE_W, o.y + NODE_H / 2, g.x0 - 5, PAD + HEAD + (L.height - PAD * 2 - HEAD) / 2, "edge spawn", ORCH, "stage" + g.stage);
    }
    for (const id of m.order) {
      const a = m.agents.get(id), q = L.pos.get(id);
      if (id === ORCH || !q) continue;
      for (const src of a.depends_on) {
        const p = L.pos.get(src);
        if (!p) continue;
        curve(p.x + NODE_W, p.y + NODE_H / 2, q.x, q.y + NODE_H / 2, "edge dep", src, id);
      }
    }
    svg.appendChild(edges);
    const nodes = s("g", { class: "nodes" });
    view.nodes = new Map();
    for (const id of m.order) {
      const a = m.agents.get(id), p = L.pos.get(id);
      if (!p) continue;
      const g = s("g", { class: "node", transform: `translate(${p.x},${p.y})`, "data-id": id, tabindex: "0" });
      g.appendChild(s("title", null, a.name + " (" + id + ")"));
      g.appendChild(s("rect", { width: NODE_W, height: NODE_H, rx: 5, class: "box" }));
      const icon = s("g", { transform: `translate(12,${NODE_H / 2})` });
      g.appendChild(icon);
      g.appendChild(s("text", { x: 24, y: NODE_H / 2 + 4, class: "label" }, clip(a.name, 15)));
      const badge = s("text", { x: NODE_W - 5, y: NODE_H / 2 + 4, class: "steps" });
      g.appendChild(badge);
      g.addEventListener("click", () => selectAgent(view, id));
      g.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); selectAgent(view, id); } });
      nodes.appendChild(g);
      view.nodes.set(id, { g, icon, badge, state: null, crit: null, sel: null, label: null });
    }
    svg.appendChild(nodes);
  }
  // State changes touch classes and one icon only: cheap enough for every frame.
  for (const [id, n] of view.nodes) {
    const a = m.agents.get(id);
    if (n.state !== a.state) {
      n.g.setAttribute("class", "node st-" + a.state);
      n.icon.replaceChildren(stateIcon(a.state));
      n.state = a.state;
      n.g.dataset.state = a.state;
    }
    const crit = view.critSet.has(id);
    if (n.crit !== crit) { n.g.classList.toggle("crit", crit); n.crit = crit; }
    n.g.classList.toggle("crit", crit);
    n.g.classList.toggle("selected", view.selected === id);
    const lbl = (a.retries.length ? "↻" + a.retries.length + " " : "") + a.nsteps;
    if (n.label !== lbl) { n.badge.textContent = lbl; n.label = lbl; }
  }
  for (const e of view.edgeEls || []) {
    const on = view.critSet.has(e.dataset.src) && view.critSet.has(e.dataset.dst) && e.dataset.src !== ORCH;
    e.classList.toggle("crit", on);
  }
}

// ---- timeline (Gantt): one row per agent; attempts as bars, tool calls as marks ----------------
const LABEL_W = 150, ROW_H = 16, AXIS_H = 22;

function nowS(m) { return m.tEnd != null ? m.tEnd : Date.now() / 1000; }

function renderGantt(view) {
  const m = view.model, svg = $("gantt"), wrap = $("gantt-wrap");
  if (m.t0 == null) return;
  const elapsed = nowS(m) - m.t0;
  const T0 = view.T;
  if (m.finished) view.T = Math.max(elapsed, 0.001);  // fit the finished job exactly
  else if (elapsed > view.T * 0.9) view.T = Math.max(view.T * 1.5, elapsed * 1.2);  // grow geometrically
  const rescale = view.T !== T0;
  // Reading clientWidth forces a layout; only do it when the size may have changed.
  if (!view.ganttWidth) { view.ganttWidth = Math.max(400, wrap.clientWidth - 4); view.ganttFull = true; }
  const width = view.ganttWidth;
  const x = (t) => LABEL_W + ((t - m.t0) / view.T) * (width - LABEL_W - 10);
  view.x = x;
  const rebuild = !!view.ganttFull || !view.rowsLayer;
  if (rebuild) {
    view.ganttFull = false;
    svg.replaceChildren();
    view.axis = svg.appendChild(s("g", { class: "axis" }));
    view.critLinks = svg.appendChild(s("g", { class: "crit-links" }));
    view.rowsLayer = svg.appendChild(s("g", { class: "rows" }));
    view.rows = new Map();
  }
  const added = m.order.filter((id) => !view.rows.has(id));
  if (rebuild || rescale || added.length) {
    const height = AXIS_H + m.order.length * ROW_H + 6;
    svg.setAttribute("width", width);
    svg.setAttribute("height", height);
    svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
    view.axis.replaceChildren();
    const step = niceStep(view.T / 8);
    for (let t = 0; t <= view.T + 1e-9; t += step) {
      const px = x(m.t0 + t);
      view.axis.appendChild(s("line", { x1: px, x2: px, y1: AXIS_H - 4, y2: height, class: "grid" }));
      view.axis.appendChild(s("text", { x: px + 2, y: AXIS_H - 8 }, fmtTick(t)));
    }
  }
  // New agents append rows (creation order never changes); a new time scale moves what exists.
  for (const id of added) {
    const i = view.rows.size;
    const g = s("g", { class: "row", transform: `translate(0,${AXIS_H + i * ROW_H})`, "data-id": id });
    g.addEventListener("click", () => selectAgent(view, id));
    view.rowsLayer.appendChild(g);
    view.rows.set(id, { g, i });
    drawRow(view, id, true);
  }
  if (rescale) { for (const id of view.rows.keys()) if (!added.includes(id)) drawRow(view, id, true); }
  else for (const id of m.touched) if (view.rows.has(id) && !added.includes(id)) drawRow(view, id, false);
  view.running = [];
  for (const row of view.rows.values()) if (row.bars) for (const b of row.bars) view.running.push(b);
  // Critical rows and the links between consecutive critical bars.
  for (const [id, r] of view.rows) r.g.classList.toggle("crit", view.critSet.has(id));
  view.critLinks.replaceChildren();
  const chain = view.crit.chain;
  for (let k = 1; k < chain.length; k++) {
    const a = m.agents.get(chain[k - 1]), b = m.agents.get(chain[k]);
    const ra = view.rows.get(a.id), rb = view.rows.get(b.id);
    const ea = a.attempts.length ? a.attempts[a.attempts.length - 1].end : null;
    const sb = b.attempts.length ? b.attempts[0].start : null;
    if (!ra || !rb || ea == null || sb == null) continue;
    view.critLinks.appendChild(s("path", {
      d: `M${x(ea)},${AXIS_H + ra.i * ROW_H + ROW_H / 2} L${x(sb)},${AXIS_H + rb.i * ROW_H + ROW_H / 2}`, class: "crit-link" }));
  }
}

// Incremental: a row keeps its elements and only creates what is new (an attempt, a tool call)
// and updates what changed (an attempt or a call that ended), so a burst of events stays cheap.
function drawRow(view, id, all) {
  const m = view.model, a = m.agents.get(id), r = view.rows.get(id), x = view.x;
  if (!r.els) {
    r.g.replaceChildren();
    r.g.appendChild(s("rect", { x: 0, y: 0, width: "100%", height: ROW_H, class: "row-bg" + (r.i % 2 ? " odd" : "") }));
    r.g.appendChild(s("text", { x: 6, y: ROW_H - 4, class: "row-label" }, clip(a.name, 20)));
    r.els = { wait: null, bars: [], marks: new Map() };
  }
  const E = r.els;
  if (a.created != null && a.attempts.length) {
    // Waiting for dependencies or a free slot: a thin line from creation to the first start.
    if (!E.wait) E.wait = r.g.appendChild(s("line", { y1: ROW_H / 2, y2: ROW_H / 2, class: "wait" }));
    E.wait.setAttribute("x1", x(a.created));
    E.wait.setAttribute("x2", x(a.attempts[0].start));
  }
  r.bars = [];
  a.attempts.forEach((at, k) => {
    let b = E.bars[k];
    if (!b) b = E.bars[k] = { el: r.g.appendChild(s("rect", { y: 2, height: ROW_H - 4, rx: 2 })), cls: null };
    const end = at.end != null ? at.end : nowS(m);
    b.el.setAttribute("x", x(at.start));
    b.el.setAttribute("width", Math.max(2, x(end) - x(at.start)));
    const cls = "bar o-" + (at.end != null ? at.outcome : "running");
    if (b.cls !== cls) { b.el.setAttribute("class", cls); b.cls = cls; }
    if (at.end == null) r.bars.push({ bar: b.el, start: at.start });
  });
  for (const st of a.steps) {
    for (const c of st.calls) {
      let mk = E.marks.get(c);
      if (mk && mk.ended && !all) continue;
      if (!mk) {
        mk = { el: r.g.appendChild(s("rect", { y: ROW_H - 6, height: 4, class: "mark" })), ended: false };
        E.marks.set(c, mk);
      }
      const x0 = x(c.ts), x1 = x(c.end != null ? c.end : nowS(m));
      mk.el.setAttribute("x", x0);
      mk.el.setAttribute("width", Math.max(1.5, x1 - x0));
      if (c.end != null) { mk.ended = true; if (c.is_error) mk.el.setAttribute("class", "mark err"); }
    }
  }
}

function niceStep(raw) {
  const p = Math.pow(10, Math.floor(Math.log10(Math.max(raw, 1e-6))));
  for (const k of [1, 2, 5, 10]) if (raw <= k * p) return k * p;
  return 10 * p;
}
const fmtTick = (t) => (t >= 120 ? Math.round(t / 60) + "m" : (Math.round(t * 100) / 100) + "s");

// Running bars grow every frame; everything else waits for events.
function animate(view) {
  const m = view.model;
  if (m.t0 == null) return;
  const end = nowS(m);
  setCounter("wall", fmtDur(m.metrics ? m.metrics.wall_time_s : end - m.t0));
  if (m.finished || !view.x) return;
  if (end - m.t0 > view.T * 0.9) { renderGantt(view); return; }
  for (const b of view.running) b.bar.setAttribute("width", Math.max(2, view.x(end) - view.x(b.start)));
}

// ---- node panel --------------------------------------------------------------------------------
function selectAgent(view, id) {
  view.selected = id;
  $("panel").hidden = false;
  renderPanel(view, id);
  for (const [nid, n] of view.nodes) n.g.classList.toggle("selected", nid === id);
}

function kv(parent, k, v) {
  if (v === undefined || v === null || v === "") return;
  const row = parent.appendChild(h("div", { class: "kv" }));
  row.appendChild(h("span", { class: "k" }, k));
  row.appendChild(h("span", { class: "v" }, v));
}
function pretty(json) {
  try { return JSON.stringify(JSON.parse(json), null, 2); } catch (_) { return json; }
}

function renderPanel(view, id) {
  const m = view.model, a = m.agents.get(id), body = $("panel-body");
  if (!a) return;
  const keep = $("panel").scrollTop;
  body.replaceChildren();
  const head = body.appendChild(h("div", { class: "panel-head" }));
  const svg = s("svg", { width: 18, height: 18, viewBox: "-9 -9 18 18", class: "st-" + a.state });
  svg.appendChild(stateIcon(a.state));
  head.appendChild(svg);
  head.appendChild(h("h2", null, a.name));
  head.appendChild(h("span", { class: "badge st-" + a.state }, a.state));
  const meta = body.appendChild(h("div", { class: "meta" }));
  kv(meta, "id", a.id);
  if (id !== ORCH) kv(meta, "stage", String(a.stage));
  kv(meta, "depends on", a.depends_on.join(", "));
  kv(meta, "tools", a.tools.join(", "));
  kv(meta, "steps", String(a.nsteps));
  kv(meta, "tool calls", String(a.ntools));
  kv(meta, "attempts", String(a.attempts.length));
  kv(meta, "on critical path", view.critSet.has(id) ? "yes" : "no");
  if (a.system_prompt) { body.appendChild(h("h3", null, "Role (system prompt)")); body.appendChild(h("pre", null, a.system_prompt)); }
  if (a.task) { body.appendChild(h("h3", null, "Task")); body.appendChild(h("pre", null, a.task)); }
  if (a.retries.length) {
    body.appendChild(h("h3", null, "Retries"));
    const ul = body.appendChild(h("ul"));
    for (const r of a.retries) ul.appendChild(h("li", null, `attempt ${r.attempt} after ${r.delay}s: ${r.reason}`));
  }
  if (a.steps.length) body.appendChild(h("h3", null, "Steps"));
  for (const st of a.steps) {
    const box = body.appendChild(h("div", { class: "step" }));
    box.appendChild(h("div", { class: "step-head" },
      `step ${st.step}` + (a.attempts.length > 1 ? ` (attempt ${st.attempt})` : "") + ` · ${st.pt} prompt + ${st.ct} completion tokens`));
    if (st.reasoning) { box.appendChild(h("div", { class: "k" }, "reasoning")); box.appendChild(h("pre", { class: "reasoning" }, st.reasoning)); }
    if (st.content) { box.appendChild(h("div", { class: "k" }, "content")); box.appendChild(h("pre", null, st.content)); }
    for (const c of st.calls) {
      const tc = box.appendChild(h("div", { class: "call" + (c.is_error ? " err" : "") }));
      tc.appendChild(h("div", { class: "call-head" }, `${c.tool}` + (c.duration != null ? ` · ${c.duration.toFixed(3)} s` : " · running")));
      tc.appendChild(h("pre", { class: "args" }, pretty(c.args)));
      if (c.result != null) tc.appendChild(h("pre", { class: "result" }, clip(c.result, 4000)));
    }
  }
  if (a.result) { body.appendChild(h("h3", null, "Result")); body.appendChild(window.renderMarkdown(a.result)); }
  if (a.error) { body.appendChild(h("h3", null, "Error")); body.appendChild(h("pre", { class: "error" }, a.error)); }
  $("panel").scrollTop = keep;
}

// ================================================================================================
// Training view: metrics.jsonl curves of several runs, overlaid, polled by byte offset
// ================================================================================================
const CHARTS = [
  { title: "Reward terms", fields: ["reward", "r_parallel", "r_finish", "r_perf"] },
  { title: "λ schedule", fields: ["lambda1", "lambda2"] },
  { title: "Critical steps", fields: ["critical_steps"] },
  { title: "Item-F1", fields: ["item_f1"] },
  { title: "Sub-agents per task", fields: ["subagents_per_task"] },
  { title: "Rollouts / s", fields: ["rollouts_per_s"] },
];
const PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#4b5563"];
const DASHES = ["", "6 3", "2 3", "8 3 2 3"];
const SEL_KEY = "swarm.runs";

function openTraining() {
  $("view-training").hidden = false;
  let stopped = false, timer = null;
  const runs = new Map();  // name -> {offset, line, records, errors, color}
  let selected = new Set(JSON.parse(localStorage.getItem(SEL_KEY) || "null") || []);
  let firstLoad = !localStorage.getItem(SEL_KEY);
  let dirty = true;

  async function poll() {
    if (stopped) return;
    try {
      const out = await api("/dashboard/api/runs");
      $("runs-dir").textContent = "from " + out.runs_dir;
      out.runs.forEach((r, i) => {
        if (!runs.has(r.name)) {
          runs.set(r.name, { name: r.name, offset: 0, line: 1, records: [], errors: [], color: PALETTE[runs.size % PALETTE.length] });
          if (firstLoad && i < 6) selected.add(r.name);
          dirty = true;
        }
      });
      firstLoad = false;
      renderRunList();
      for (const name of selected) {
        const r = runs.get(name);
        if (!r) continue;
        for (let pages = 0; pages < 50; pages++) {
          let chunk;
          try {
            chunk = await api(`/dashboard/api/runs/${encodeURIComponent(name)}/metrics?offset=${r.offset}&line=${r.line}`);
          } catch (e) {
            if (e.status === 409) { r.offset = 0; r.line = 1; r.records = []; r.errors = []; dirty = true; continue; }  // file rewritten
            throw e;
          }
          if (chunk.records.length || chunk.errors.length) dirty = true;
          r.records.push(...chunk.records);
          r.errors.push(...chunk.errors);
          r.offset = chunk.next_offset; r.line = chunk.next_line;
          if (chunk.eof) break;
        }
      }
      banner("");
    } catch (e) {
      if (e.message !== "unauthorized") banner("Cannot read training runs: " + e.message);
    }
    if (dirty) { dirty = false; renderCharts(); }
    if (!stopped) timer = setTimeout(poll, document.hidden ? 10000 : 3000);
  }

  function renderRunList() {
    const box = $("runs");
    if (box.childElementCount === runs.size && runs.size) return;
    box.replaceChildren();
    if (!runs.size) box.appendChild(h("p", { class: "muted" }, "No runs yet: the trainer writes <runs dir>/<run>/metrics.jsonl."));
    for (const r of runs.values()) {
      const lab = box.appendChild(h("label", { class: "run" }));
      const cb = lab.appendChild(h("input", { type: "checkbox", "data-run": r.name }));
      cb.checked = selected.has(r.name);
      cb.addEventListener("change", () => {
        if (cb.checked) selected.add(r.name); else selected.delete(r.name);
        localStorage.setItem(SEL_KEY, JSON.stringify([...selected]));
        clearTimeout(timer);
        dirty = true;
        poll();
      });
      const sw = lab.appendChild(h("span", { class: "swatch" }));
      sw.style.background = r.color;
      lab.appendChild(document.createTextNode(r.name));
    }
  }

  function renderCharts() {
    const shown = [...runs.values()].filter((r) => selected.has(r.name));
    const errs = $("metric-errors");
    errs.replaceChildren();
    for (const r of shown) for (const e of r.errors.slice(0, 3)) errs.appendChild(h("div", null, `${r.name}: ${e.message}`));
    const fields = new Set();
    for (const r of shown) for (const rec of r.records) for (const k in rec.values) fields.add(k);
    const known = new Set(CHARTS.flatMap((c) => c.fields));
    const defs = CHARTS.filter((c) => c.fields.some((f) => fields.has(f)));
    for (const f of [...fields].sort()) if (!known.has(f)) defs.push({ title: f, fields: [f] });
    const box = $("charts");
    box.replaceChildren();
    if (!shown.length) { box.appendChild(h("p", { class: "muted" }, "Select a run to plot its curves.")); return; }
    for (const d of defs) box.appendChild(lineChart(d, shown));
  }

  const onResize = () => renderCharts();
  window.addEventListener("resize", onResize);
  poll();
  window.__dash.training = { runs };
  return { stop() { stopped = true; clearTimeout(timer); window.removeEventListener("resize", onResize); } };
}

function lineChart(def, runs) {
  const card = h("div", { class: "chart card", "data-chart": def.title });
  card.appendChild(h("h3", null, def.title));
  const W = Math.max(320, Math.min(620, ($("charts").clientWidth || 960) / 2 - 24)), H = 210;
  const M = { l: 48, r: 10, t: 8, b: 24 };
  const series = [];
  let xmin = Infinity, xmax = -Infinity, ymin = Infinity, ymax = -Infinity;
  for (const r of runs) {
    def.fields.forEach((f, fi) => {
      const pts = [];
      for (const rec of r.records) {
        const v = rec.values[f];
        if (v === null || v === undefined) continue;
        pts.push([rec.step, v]);
        xmin = Math.min(xmin, rec.step); xmax = Math.max(xmax, rec.step);
        ymin = Math.min(ymin, v); ymax = Math.max(ymax, v);
      }
      if (pts.length) { pts.sort((p, q) => p[0] - q[0]); series.push({ run: r, field: f, dash: DASHES[fi % DASHES.length], pts }); }
    });
  }
  card.style.width = W + 30 + "px";  // the legend wraps under the chart instead of widening the card
  const svg = card.appendChild(s("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: "linechart" }));
  if (!series.length) { card.appendChild(h("p", { class: "muted" }, "no data")); return card; }
  if (xmax === xmin) { xmax = xmin + 1; }
  if (ymax === ymin) { ymax += Math.abs(ymax) * 0.1 || 1; ymin -= Math.abs(ymin) * 0.1 || 0; }
  const pad = (ymax - ymin) * 0.05; ymin -= pad; ymax += pad;
  const X = (v) => M.l + ((v - xmin) / (xmax - xmin)) * (W - M.l - M.r);
  const Y = (v) => H - M.b - ((v - ymin) / (ymax - ymin)) * (H - M.t - M.b);
  const ys = niceStep((ymax - ymin) / 5);
  for (let v = Math.ceil(ymin / ys) * ys; v <= ymax; v += ys) {
    svg.appendChild(s("line", { x1: M.l, x2: W - M.r, y1: Y(v), y2: Y(v), class: "grid" }));
    svg.appendChild(s("text", { x: M.l - 4, y: Y(v) + 4, class: "tick", "text-anchor": "end" }, +v.toPrecision(4)));
  }
  const xs = niceStep((xmax - xmin) / 6);
  for (let v = Math.ceil(xmin / xs) * xs; v <= xmax; v += xs) {
    svg.appendChild(s("text", { x: X(v), y: H - 6, class: "tick", "text-anchor": "middle" }, +v.toPrecision(6)));
  }
  svg.appendChild(s("line", { x1: M.l, x2: M.l, y1: M.t, y2: H - M.b, class: "axis-line" }));
  svg.appendChild(s("line", { x1: M.l, x2: W - M.r, y1: H - M.b, y2: H - M.b, class: "axis-line" }));
  for (const se of series) {
    const d = se.pts.map((p, i) => (i ? "L" : "M") + X(p[0]).toFixed(1) + "," + Y(p[1]).toFixed(1)).join("");
    const path = s("path", { d, class: "series", stroke: se.run.color, "data-run": se.run.name, "data-field": se.field });
    if (se.dash) path.setAttribute("stroke-dasharray", se.dash);
    path.appendChild(s("title", null, `${se.run.name} · ${se.field} · last ${se.pts[se.pts.length - 1][1]}`));
    svg.appendChild(path);
  }
  // Hover: a cursor line and each series' value at the nearest logged step.
  const cursor = svg.appendChild(s("line", { y1: M.t, y2: H - M.b, class: "cursor", visibility: "hidden" }));
  const tip = card.appendChild(h("div", { class: "tip", hidden: "" }));
  svg.addEventListener("mousemove", (e) => {
    const r = svg.getBoundingClientRect();
    const px = ((e.clientX - r.left) / r.width) * W;
    if (px < M.l || px > W - M.r) { cursor.setAttribute("visibility", "hidden"); tip.hidden = true; return; }
    const step = xmin + ((px - M.l) / (W - M.l - M.r)) * (xmax - xmin);
    tip.replaceChildren();
    let shownStep = null;
    for (const se of series) {
      let lo = 0, hi = se.pts.length - 1;
      while (lo < hi) { const mid = (lo + hi) >> 1; if (se.pts[mid][0] < step) lo = mid + 1; else hi = mid; }
      if (lo > 0 && Math.abs(se.pts[lo - 1][0] - step) < Math.abs(se.pts[lo][0] - step)) lo -= 1;
      const [sx, sy] = se.pts[lo];
      if (shownStep === null) { shownStep = sx; tip.appendChild(h("div", { class: "tip-head" }, "step " + sx)); }
      const row = tip.appendChild(h("div"));
      const sw = row.appendChild(h("span", { class: "swatch" }));
      sw.style.background = se.run.color;
      row.appendChild(document.createTextNode(` ${se.run.name} · ${se.field}: ${+sy.toPrecision(5)}` + (sx !== shownStep ? ` (step ${sx})` : "")));
    }
    cursor.setAttribute("x1", X(shownStep)); cursor.setAttribute("x2", X(shownStep));
    cursor.setAttribute("visibility", "visible");
    tip.hidden = false;
    tip.style.left = Math.min(e.clientX - card.getBoundingClientRect().left + 14, card.clientWidth - 220) + "px";
  });
  svg.addEventListener("mouseleave", () => { cursor.setAttribute("visibility", "hidden"); tip.hidden = true; });
  const legend = card.appendChild(h("div", { class: "chart-legend" }));
  for (const se of series) {
    const item = legend.appendChild(h("span"));
    const ls = item.appendChild(s("svg", { width: 22, height: 8 }));
    const ln = ls.appendChild(s("line", { x1: 0, x2: 22, y1: 4, y2: 4, stroke: se.run.color, "stroke-width": 2 }));
    if (se.dash) ln.setAttribute("stroke-dasharray", se.dash);
    item.appendChild(document.createTextNode(`${se.run.name} · ${se.field}`));
  }
  return card;
}

// ---- start -------------------------------------------------------------------------------------
showAuthState();
route();
