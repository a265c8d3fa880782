// velotune studio: the page. State comes from the server's event stream (/api/events): the run
// list when it changes and every run's new metrics.jsonl records; the rest is fetched on demand.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const state = { runs: [], metrics: {}, selected: null, compare: new Set(), charts: {}, chat: [] };
const $ = (id) => document.getElementById(id);

function api(path) {
  return token ? `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(token)}` : path;
}

async function call(method, path, body) {
  const response = await fetch(api(path), {
    method, headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const value = await response.json();
  if (!response.ok) throw new Error(value.error || `${response.status}`);
  return value;
}

function text(tag, content, className) {
  const node = document.createElement(tag);
  node.textContent = content;
  if (className) node.className = className;
  return node;
}

// --- charts ---------------------------------------------------------------------------------

const COLORS = ["#3564d4", "#e0702a", "#2a9d5b", "#c73535", "#8a5cc2", "#8c6d31", "#d45fa8", "#5c6b7a"];

function series(records, key) {
  const rows = records.filter((r) => typeof r[key] === "number" && Number.isFinite(r[key]));
  return [rows.map((r) => r.step), rows.map((r) => r[key])];
}

// Axis labels: small numbers (learning rates) in exponent form, others with as many decimals as
// the spacing of the ticks needs (a memory curve may move in its fourth decimal).
function labels(ticks) {
  const step = ticks.length > 1 ? Math.abs(ticks[1] - ticks[0]) : 0;
  const decimals = step > 0 ? Math.min(6, Math.max(0, Math.ceil(-Math.log10(step)))) : 3;
  return ticks.map((v) => v == null ? "" : v !== 0 && Math.abs(v) < 0.01 ? v.toExponential(1) :
    v.toLocaleString(undefined, { maximumFractionDigits: decimals }));
}

// One chart per element: created on first data, then only fed new data (uPlot.setData).
function draw(id, lines) {
  const el = $(id);
  const drawn = lines.filter((l) => l.data[0].length > 0);
  el.dataset.points = drawn.length ? Math.max(...drawn.map((l) => l.data[0].length)) : 0;
  const key = drawn.map((l) => l.label).join("|");
  let chart = state.charts[id];
  if (!drawn.length) {
    if (chart) { chart.chart.destroy(); delete state.charts[id]; }
    return;
  }
  const data = drawn.length === 1 ? [drawn[0].data[0], drawn[0].data[1]] : uPlot.join(drawn.map((l) => l.data));
  if (chart && chart.key === key) { chart.chart.setData(data); return; }
  if (chart) chart.chart.destroy();
  const opts = {
    width: Math.max(el.clientWidth, 300), height: 210,
    scales: { x: { time: false } },
    axes: [{ label: "step" }, { values: (u, ticks) => labels(ticks), size: 60 }],
    series: [{ label: "step" }, ...drawn.map((l, i) => ({
      label: l.label, stroke: l.color || COLORS[i % COLORS.length], width: 2, spanGaps: true,
      points: { show: l.points || false },
    }))],
  };
  state.charts[id] = { key, chart: new uPlot(opts, data, el) };
}

function drawRun() {
  const name = state.selected;
  if (!name) return;
  const records = state.metrics[name] || [];
  draw("chart-loss", [{ label: "train loss", data: series(records, "loss") },
                      { label: "eval loss", data: series(records, "eval_loss"), color: "#e0702a", points: true }]);
  draw("chart-lr", [{ label: "learning rate", data: series(records, "lr"), color: "#2a9d5b" }]);
  draw("chart-tokens", [{ label: "tokens/s", data: series(records, "tokens_per_s"), color: "#8a5cc2" }]);
  draw("chart-memory", [{ label: "GiB", data: series(records, "peak_memory_gib"), color: "#c73535" }]);
}

function drawCompare() {
  $("compare").hidden = state.compare.size === 0;
  const metric = $("compare-metric").value;
  draw("compare-chart", [...state.compare].sort().map((name) => ({
    label: name, data: series(state.metrics[name] || [], metric), points: metric === "eval_loss" })));
}

// --- run list ---------------------------------------------------------------------------------

function renderRuns() {
  const list = $("run-list");
  list.replaceChildren();
  $("no-runs").hidden = state.runs.length > 0;
  for (const run of state.runs) {
    const item = document.createElement("li");
    item.dataset.run = run.name;
    item.dataset.status = run.status;
    if (run.name === state.selected) item.classList.add("selected");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.title = "compare";
    box.checked = state.compare.has(run.name);
    box.addEventListener("click", (e) => {
      e.stopPropagation();
      if (box.checked) state.compare.add(run.name); else state.compare.delete(run.name);
      drawCompare();
    });
    item.append(box, text("span", run.name, "name"),
      text("span", run.max_steps ? `${run.last_step}/${run.max_steps}` : `${run.last_step}`, "step"),
      text("span", run.status, `badge ${run.status}`));
    item.addEventListener("click", () => select(run.name));
    list.append(item);
  }
  const current = state.runs.find((r) => r.name === state.selected);
  if (current) showStatus(current);
}

function showStatus(run) {
  const badge = $("run-status");
  badge.textContent = run.status;
  badge.className = `badge ${run.status}`;
  $("stop-button").hidden = run.status !== "running";
  const loss = run.last_loss == null ? "" : `, loss ${run.last_loss.toFixed(4)}`;
  $("run-facts").textContent = `${run.method || "?"} on ${run.model || "?"}; step ${run.last_step}` +
    `${run.max_steps ? " of " + run.max_steps : ""}${loss}; checkpoints: ${run.checkpoints.join(", ") || "none"}`;
  const wasFinished = $("run").dataset.finished === "yes";
  if (run.has_result && !wasFinished) loadDetail(run.name);   // answers and exports appear at the end
}

async function select(name) {
  state.selected = name;
  state.chat = [];
  $("new-run").hidden = true;
  $("run").hidden = false;
  $("run-name").textContent = name;
  $("run").dataset.finished = "";
  for (const id of ["chart-loss", "chart-lr", "chart-tokens", "chart-memory"]) {
    if (state.charts[id]) { state.charts[id].chart.destroy(); delete state.charts[id]; }
  }
  $("chat-log").replaceChildren();
  renderRuns();
  drawRun();
  await loadDetail(name);
}

async function loadDetail(name) {
  let run;
  try { run = await call("GET", `/api/runs/${encodeURIComponent(name)}`); } catch (e) { return; }
  if (name !== state.selected) return;
  $("run").dataset.finished = run.has_result ? "yes" : "";
  showStatus(run);
  $("run-config").textContent = run.config || "(not written yet)";
  $("run-log").textContent = run.log;
  $("log-box").hidden = !run.log;
  const body = $("samples").querySelector("tbody");
  body.replaceChildren();
  for (const s of run.samples) {
    const row = document.createElement("tr");
    row.append(text("td", s.prompt), text("td", s.before ?? "(resumed run)"), text("td", s.after));
    body.append(row);
  }
  $("no-samples").hidden = run.samples.length > 0;
  $("samples").hidden = run.samples.length === 0;
  const exports = $("exports");
  exports.replaceChildren();
  for (const e of run.exports) {
    exports.append(text("li", `${e.name}: ${e.files.map((f) => `${f.name} (${(f.bytes / 2 ** 20).toFixed(1)} MiB)`).join(", ")}`));
  }
  if (!run.exports.length) exports.append(text("li", "none (set export in the config, or velotune export)"));
  $("chat-form").hidden = !run.has_result;
  $("chat-note").textContent = run.has_result ? "Greedy answers from the trained adapter, on this machine." :
    "The adapter is saved when the run finishes; chat then.";
}

// --- events -------------------------------------------------------------------------------------

function connect() {
  const events = new EventSource(api("/api/events"));
  events.onopen = () => { $("connection").textContent = "live"; $("connection").className = "badge live"; };
  events.onerror = () => { $("connection").textContent = "reconnecting"; $("connection").className = "badge"; };
  events.addEventListener("runs", (e) => { state.runs = JSON.parse(e.data); renderRuns(); });
  events.addEventListener("metrics", (e) => {
    const { run, records, restart } = JSON.parse(e.data);
    state.metrics[run] = restart ? records : (state.metrics[run] || []).concat(records);
    if (run === state.selected) drawRun();
    if (state.compare.has(run)) drawCompare();
  });
  // a reconnect replays every record: start from nothing so nothing is counted twice
  events.addEventListener("open", () => { state.metrics = {}; });
}

// --- forms ----------------------------------------------------------------------------------------

function showResult(nodes) { $("check-result").replaceChildren(...nodes); }

function estimateLines(est) {
  if (est.error) return [text("p", est.error, "hint")];
  const gib = (v) => `${v.toFixed(2)} GiB`;
  const lines = [text("p", `Estimated peak GPU memory ${gib(est.total_gib)}: weights ${gib(est.weights_gib)}, ` +
    `optimizer ${gib(est.optimizer_gib)}, activations ${gib(est.activations_gib)}; ` +
    `${est.trainable_parameters.toLocaleString()} of ${est.parameters.toLocaleString()} parameters trained.`)];
  if (est.fits === true) lines.push(text("p", `Fits on ${est.device}.`, "ok"));
  else if (est.fits === false) {
    lines.push(text("p", `Does not fit on ${est.device}. ` +
      (est.fixes.length ? `What fits: ${est.fixes.join("; or ")}` : "No single change fits."), "error"));
  } else lines.push(text("p", est.device, "hint"));
  return lines;
}

async function check() {
  showResult([text("p", "Checking the config and estimating memory…", "hint")]);
  try {
    const result = await call("POST", "/api/check", { name: $("new-name").value, config: $("new-config").value });
    showResult([text("p", `Config OK: ${result.method}, into ${result.output_dir}`, "ok"),
      ...result.warnings.map((w) => text("p", w, "error")), ...estimateLines(result.estimate)]);
    return true;
  } catch (e) {
    showResult([text("p", e.message, "error")]);
    return false;
  }
}

async function start() {
  const name = $("new-name").value;
  $("start-button").disabled = true;
  try {
    await call("POST", "/api/runs", { name, config: $("new-config").value });
    showResult([text("p", `Started ${name}.`, "ok")]);
    await select(name);
  } catch (e) {
    showResult([text("p", e.message, "error")]);
  } finally {
    $("start-button").disabled = false;
  }
}

async function stop() {
  $("stop-button").disabled = true;
  try { await call("POST", `/api/runs/${encodeURIComponent(state.selected)}/stop`); }
  catch (e) { $("run-facts").textContent = e.message; }
  finally { $("stop-button").disabled = false; }
}

async function send(event) {
  event.preventDefault();
  const input = $("chat-input");
  if (!input.value.trim()) return;
  state.chat.push({ role: "user", content: input.value });
  $("chat-log").append(text("p", `you: ${input.value}`, "user"));
  input.value = "";
  try {
    const { reply } = await call("POST", `/api/runs/${encodeURIComponent(state.selected)}/chat`, { messages: state.chat });
    state.chat.push({ role: "assistant", content: reply });
    $("chat-log").append(text("p", `model: ${reply}`, "assistant"));
  } catch (e) {
    state.chat.pop();
    $("chat-log").append(text("p", e.message, "error"));
  }
}

$("new-run-button").addEventListener("click", () => { $("run").hidden = true; $("new-run").hidden = false; state.selected = null; renderRuns(); });
$("check-button").addEventListener("click", check);
$("start-button").addEventListener("click", start);
$("stop-button").addEventListener("click", stop);
$("chat-form").addEventListener("submit", send);
$("compare-metric").addEventListener("change", drawCompare);
$("new-run").hidden = false;
connect();
