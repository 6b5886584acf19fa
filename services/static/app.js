// The steering playground: plain JavaScript over the service's JSON mirror (/v1/steering/<Rpc>,
// bodies in protobuf's JSON mapping). No framework, no CDN: this file is the whole front end.
"use strict";

const $ = (id) => document.getElementById(id);
const OPS = {
  EDIT_OP_SET: { name: "set", min: -20, max: 100, step: 0.5, initial: 20 },
  EDIT_OP_ADD: { name: "add", min: -50, max: 50, step: 0.5, initial: 10 },
  EDIT_OP_SCALE: { name: "scale", min: 0, max: 10, step: 0.1, initial: 2 },
  EDIT_OP_CAP: { name: "cap", min: 0, max: 50, step: 0.5, initial: 0 },
  EDIT_OP_ABLATE: { name: "ablate", min: 0, max: 0, step: 1, initial: 0 },
};
const state = { models: [], model: null, edits: [], image: null, maskDirty: false, last: {}, searches: 0 };
window.playground = state; // read by the browser test

// -- API --------------------------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  const token = $("token").value.trim();
  if (token) h.Authorization = "Bearer " + token;
  return h;
}

function apiError(body, status) {
  const e = (body && body.error) || {};
  return new Error(`${e.code || "HTTP " + status}: ${e.message || "request failed"}`);
}

async function rpc(name, body) {
  const response = await fetch("/v1/steering/" + name, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  const json = await response.json().catch(() => ({}));
  if (!response.ok) throw apiError(json, response.status);
  return json;
}

// GenerateStream as server-sent events over fetch (EventSource cannot POST): yields each message.
async function* generateStream(body) {
  const response = await fetch("/v1/steering/GenerateStream", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) throw apiError(await response.json().catch(() => ({})), response.status);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      const message = JSON.parse(data);
      if (event === "error") throw apiError(message, 500);
      yield message;
    }
  }
}

function showError(err) {
  $("error").textContent = String(err.message || err);
  $("error").hidden = false;
  $("status").textContent = "";
}

// -- models and features ----------------------------------------------------------------------
async function loadModels() {
  const { models = [] } = await rpc("ListModels", {});
  state.models = models;
  $("model").innerHTML = "";
  for (const m of models) $("model").append(new Option(`${m.name} (${m.kind})`, m.name));
  if (models.length) selectModel(models[0].name);
}

function selectModel(name) {
  const model = state.models.find((m) => m.name === name);
  state.model = model;
  state.edits = [];
  state.last = {};
  $("model").value = name;
  const saes = model.saes || [];
  $("model-info").textContent = $("model-info").title = `${model.description || ""} ${saes.map((s) => `${s.name}: ${s.width} latents at ${s.hookName}`).join("; ")}${model.hasRiskProbe ? "; risk probe" : ""}`;
  $("sae").innerHTML = "";
  for (const s of saes) $("sae").append(new Option(s.name, s.name));
  const image = model.kind === "sdxl_turbo";
  $("text-options").hidden = image;
  $("text-results").hidden = image;
  $("image-options").hidden = !image;
  $("image-results").hidden = !image;
  $("image-upload").hidden = model.kind !== "llava";
  $("scope-tokens").parentElement.hidden = image;
  $("features").innerHTML = "";
  renderEdits();
  resetMask();
  searchFeatures();
}

async function searchFeatures() {
  const sae = $("sae").value;
  if (!state.model || !sae) return;
  const query = $("feature-query").value.trim();
  const body = { model: state.model.name, sae, limit: 50 };
  if (/^\d+$/.test(query)) body.index = Number(query);
  else body.query = query;
  const search = ++state.searches;
  try {
    const { features = [] } = await rpc("SearchFeatures", body);
    if (search !== state.searches) return; // a newer search was sent meanwhile
    const list = $("features");
    list.innerHTML = "";
    for (const f of features) {
      const li = document.createElement("li");
      li.dataset.index = f.index;
      li.innerHTML = `<span><b></b> <span class="muted"></span></span>`;
      li.querySelector("b").textContent = f.label || "(no label)";
      li.querySelector(".muted").textContent = `${f.sae} #${f.index}`;
      const add = document.createElement("button");
      add.textContent = "add";
      add.className = "add-feature";
      add.onclick = () => addEdit(f);
      li.append(add);
      list.append(li);
    }
    if (!features.length) list.innerHTML = `<li class="muted">no feature matches</li>`;
  } catch (err) { showError(err); }
}

// -- edits ------------------------------------------------------------------------------------
function addEdit(feature) {
  state.edits.push({ sae: feature.sae, index: Number(feature.index), label: feature.label || "", op: "EDIT_OP_SET", value: OPS.EDIT_OP_SET.initial });
  renderEdits();
}

function renderEdits() {
  const box = $("edits");
  box.innerHTML = "";
  $("no-edits").hidden = state.edits.length > 0;
  state.edits.forEach((e, n) => {
    const div = document.createElement("div");
    div.className = "edit";
    div.innerHTML = `<div class="title"><span></span><button title="remove">&times;</button></div>
      <div class="row"><select class="op"></select><input type="range" class="value-slider"><output class="value"></output></div>`;
    div.querySelector(".title span").textContent = `${e.label || "latent"} (${e.sae} #${e.index})`;
    div.querySelector("button").onclick = () => { state.edits.splice(n, 1); renderEdits(); };
    const op = div.querySelector(".op"), slider = div.querySelector(".value-slider"), out = div.querySelector(".value");
    for (const [key, spec] of Object.entries(OPS)) op.append(new Option(spec.name, key));
    op.value = e.op;
    const sync = () => {
      const spec = OPS[e.op];
      Object.assign(slider, { min: spec.min, max: spec.max, step: spec.step });
      slider.value = e.value;
      slider.disabled = e.op === "EDIT_OP_ABLATE";
      out.textContent = e.op === "EDIT_OP_ABLATE" ? "" : e.value;
    };
    op.onchange = () => { e.op = op.value; e.value = OPS[e.op].initial; sync(); };
    slider.oninput = () => { e.value = Number(slider.value); out.textContent = e.value; };
    sync();
    box.append(div);
  });
}

function plan(includeMask) {
  const p = {
    edits: state.edits.map((e) => ({ sae: e.sae, op: e.op, latents: [e.index], value: e.value })),
    scope: { tokens: $("scope-tokens").value },
    preserveError: $("preserve-error").checked,
  };
  if (includeMask && $("mask-on").checked && state.maskDirty) p.scope.mask = maskValues();
  return p;
}

// -- text -------------------------------------------------------------------------------------
function riskColor(r) { return `rgba(220, 50, 47, ${(0.08 + 0.6 * r).toFixed(3)})`; }

function tokenSpan(token, risk) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = token.text;
  if (risk !== undefined && risk !== null) {
    span.dataset.risk = risk;
    span.style.background = riskColor(risk);
    span.title = `risk ${risk.toFixed(3)}`;
  }
  return span;
}

function riskSummary(response) {
  const parts = [];
  if (response.risk) parts.push(`risk ${response.risk.score.toFixed(3)}`);
  if (response.riskPrompt) parts.push(`prompt risk ${response.riskPrompt.score.toFixed(3)}`);
  if (response.timings) parts.push(`${Math.round(response.timings.totalMs)} ms, batch of ${response.timings.batchSize}`);
  return parts.join(" · ");
}

function textCommon() {
  const body = {
    model: state.model.name,
    prompt: $("prompt").value,
    params: { maxNewTokens: Number($("max-tokens").value), temperature: Number($("temperature").value) },
    seed: String(Number($("seed").value)),
    returnLatents: { topK: Number($("top-k").value) },
  };
  return body;
}

async function streamInto(body, which) {
  const box = $(which + "-text");
  box.textContent = "";
  delete box.dataset.done;
  for await (const message of generateStream(body)) {
    if (message.final) {
      state.last[which] = message.final;
      $(which + "-risk").textContent = riskSummary(message.final);
      box.dataset.done = "1";
    } else {
      box.append(tokenSpan(message.token, message.runningRisk));
    }
  }
}

function showCompletion(which, completion, response) {
  const box = $(which + "-text");
  box.textContent = "";
  for (const t of completion.tokens || []) box.append(tokenSpan(t));
  $(which + "-risk").textContent = riskSummary(response);
  box.dataset.done = "1";
}

async function runText() {
  const common = textCommon();
  if (state.model.kind === "llava" && state.image) {
    const response = await rpc("GenerateMultimodal", { ...common, image: state.image, plan: plan(false), includeDefault: true });
    state.last = { steered: response, default: response };
    showCompletion("steered", response.completion, response);
    showCompletion("default", response.defaultCompletion || { tokens: [] }, {});
    renderHeatmap(response.completion.tokens || []);
    return;
  }
  // Steered and unsteered as two concurrent streams with one seed: they share the model's batches.
  await Promise.all([streamInto({ ...common, plan: plan(false) }, "steered"), streamInto(common, "default")]);
  renderHeatmap(state.last.steered.completion.tokens || []);
}

function renderHeatmap(tokens) {
  const edited = new Set(state.edits.map((e) => `${e.sae}#${e.index}`));
  const rows = new Map(); // "sae#index" -> {label, values per token}
  tokens.forEach((t, col) => {
    for (const sl of t.latents || []) {
      for (const a of sl.after || []) {
        const key = `${sl.sae}#${a.index}`;
        if (!rows.has(key)) rows.set(key, { label: a.label || "", values: new Array(tokens.length).fill(0) });
        rows.get(key).values[col] = a.value || 0;
      }
    }
  });
  const keys = [...rows.keys()].sort((a, b) => (edited.has(b) - edited.has(a)) || (Math.max(...rows.get(b).values) - Math.max(...rows.get(a).values))).slice(0, 16);
  const table = document.createElement("table");
  const head = table.insertRow();
  head.append(document.createElement("th"));
  for (const t of tokens) { const th = document.createElement("th"); th.className = "col"; th.textContent = t.text; head.append(th); }
  for (const key of keys) {
    const row = table.insertRow();
    row.dataset.latent = key;
    const th = document.createElement("th");
    th.className = "latent";
    th.textContent = `${rows.get(key).label || key}${edited.has(key) ? " ✎" : ""}`;
    row.append(th);
    const max = Math.max(1e-6, ...rows.get(key).values.map(Math.abs)); // per row: an edit's 100 leaves others visible
    for (const v of rows.get(key).values) {
      const cell = row.insertCell();
      cell.style.background = `rgba(36, 99, 199, ${(Math.abs(v) / max).toFixed(3)})`;
      cell.title = v.toFixed(3);
      cell.dataset.value = v;
    }
  }
  $("heatmap").innerHTML = "";
  $("heatmap").append(table);
}

// -- images -----------------------------------------------------------------------------------
function imageSize() { return Number($("image-size").value); }

function resetMask() {
  const canvas = $("mask");
  canvas.width = canvas.height = imageSize();
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  state.maskDirty = false;
}

function paint(event) {
  if (!$("mask-on").checked) return;
  const canvas = $("mask");
  const box = canvas.getBoundingClientRect();
  const x = ((event.clientX - box.left) / box.width) * canvas.width;
  const y = ((event.clientY - box.top) / box.height) * canvas.height;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "rgba(36, 99, 199, 0.5)";
  ctx.beginPath();
  ctx.arc(x, y, canvas.width / 10, 0, 2 * Math.PI);
  ctx.fill();
  state.maskDirty = true;
}

function maskValues() {
  const canvas = $("mask");
  const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  const values = [];
  for (let i = 3; i < data.length; i += 4) values.push(data[i] > 0 ? 1 : 0);
  return { height: canvas.height, width: canvas.width, values };
}

async function runImage() {
  const size = imageSize();
  if ($("mask").width !== size) resetMask();
  const response = await rpc("GenerateImage", {
    model: state.model.name,
    prompt: $("prompt").value,
    numInferenceSteps: Number($("steps").value),
    height: size,
    width: size,
    seed: String(Number($("image-seed").value)),
    plan: plan(true),
    includeDefault: true,
    returnLatents: { topK: 4 },
  });
  state.last = { image: response };
  $("steered-image").src = "data:image/png;base64," + response.png;
  $("default-image").src = "data:image/png;base64," + (response.defaultPng || response.png);
  const maps = $("latent-maps");
  maps.innerHTML = "";
  (response.latentMaps || []).forEach((m, n) => {
    const fig = document.createElement("figure");
    fig.innerHTML = `<img alt=""><figcaption></figcaption>`;
    fig.querySelector("img").src = "data:image/png;base64," + m.heatmapPng;
    fig.querySelector("figcaption").textContent = `${m.label || m.sae + " #" + m.latent} (mean ${(m.mean || 0).toFixed(2)})`;
    fig.onclick = () => showOverlay(n);
    maps.append(fig);
  });
  if ((response.latentMaps || []).length) showOverlay(0);
  $("status").textContent = riskSummary(response);
}

function showOverlay(n) {
  const m = state.last.image.latentMaps[n];
  $("overlay").src = "data:image/png;base64," + m.heatmapPng;
  $("overlay").hidden = false;
  [...$("latent-maps").children].forEach((fig, k) => fig.classList.toggle("selected", k === n));
}

// -- wiring -----------------------------------------------------------------------------------
async function run() {
  $("error").hidden = true;
  $("run").disabled = true;
  $("status").textContent = "generating…";
  const started = performance.now();
  try {
    if (state.model.kind === "sdxl_turbo") await runImage();
    else await runText();
    if (state.model.kind !== "sdxl_turbo") $("status").textContent = `done in ${Math.round(performance.now() - started)} ms`;
    document.body.dataset.runs = String(Number(document.body.dataset.runs || 0) + 1);
  } catch (err) {
    showError(err);
  } finally {
    $("run").disabled = false;
  }
}

function readImage(file) {
  const reader = new FileReader();
  reader.onload = () => {
    state.image = String(reader.result).split(",", 2)[1];
    $("image-preview").src = reader.result;
    $("image-preview").hidden = false;
  };
  reader.readAsDataURL(file);
}

window.addEventListener("DOMContentLoaded", () => {
  $("token").value = localStorage.getItem("steeringToken") || "";
  $("token").onchange = () => { localStorage.setItem("steeringToken", $("token").value); loadModels().catch(showError); };
  $("model").onchange = () => selectModel($("model").value);
  $("sae").onchange = searchFeatures;
  $("feature-search").onclick = searchFeatures;
  $("feature-query").onkeydown = (e) => { if (e.key === "Enter") searchFeatures(); };
  $("run").onclick = run;
  $("image-file").onchange = () => { if ($("image-file").files[0]) readImage($("image-file").files[0]); };
  $("image-size").onchange = resetMask;
  $("mask-clear").onclick = resetMask;
  let painting = false;
  $("mask").onpointerdown = (e) => { painting = true; paint(e); };
  $("mask").onpointermove = (e) => { if (painting) paint(e); };
  window.addEventListener("pointerup", () => { painting = false; });
  loadModels().catch(showError);
});
