// sdx4 web page: plain JavaScript, no build step, no external resources, nothing inline (the page's CSP).
// Flow: GET /v1/info -> the controls (methods, choices, defaults, limits, LoRAs) -> pick/drop images (each
// decoded here with createImageBitmap first, so an unreadable file is named before any upload) -> the time
// estimate (POST /v1/estimate, when the server has it) -> one POST /v1/jobs per file -> progress from
// GET /v1/jobs/{id}/events (server-sent events read with fetch, so the API key header can be sent) and
// GET /v1/jobs for the queued ones -> GET /v1/jobs/{id}/result -> the job list (downloads) and the
// comparison: the input upscaled here to the output's size (nearest or smooth) beside the result, fitted
// with a before/after slider, or at 1:1, 2x, 4x in a loupe whose two panes pan together.
"use strict";

const $ = (id) => document.getElementById(id);
const FINISHED = ["done", "failed", "cancelled"];
// Every option field the page may send, in form order; one is sent only when the server offers it
// (/v1/info's defaults, or its "loras" list), it is enabled and not empty (empty = the server's default; for
// "lora" every LoRA the server offers, named by /v1/info's defaults.lora).
const FIELDS = ["prompt", "negative_prompt", "method", "scale", "color_fix", "width", "height", "num_images", "lora",
  "steps", "guidance", "noise_level", "seed", "eta", "scheduler"];
// What only the diffusion model reads; the other methods ignore these fields, so the page disables them.
const MODEL_ONLY = ["prompt", "negative_prompt", "steps", "guidance", "noise_level", "seed", "eta", "scheduler", "lora"];
const METHOD_TITLES = { sd: "sd (model)", realesrgan: "realesrgan (GAN)" };
const ZOOMS = [1, 2, 4];

const state = {
  info: null,
  files: [],            // [{file, w, h}] the readable files chosen (w, h null: no preview in this browser)
  batch: null,          // the jobs being followed: {jobs: [...], abort}
  jobs: new Map(),      // id -> {id, name, file, method, snap, urls, filenames, row}
  shown: null,          // the job in the comparison
  estimate: { timer: null, abort: null, absent: false },
  loupe: { zoom: "fit", cx: 0, cy: 0, x: 0, y: 0 },
  drag: null,
};

function apiKey() { return sessionStorage.getItem("sdx4-api-key") || ""; }
function headers() { const k = apiKey(); return k ? { "Authorization": "Bearer " + k } : {}; }

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (res.status === 401) { $("key-box").hidden = false; }
  if (!res.ok) {
    let detail = res.status + " " + res.statusText;
    try { const body = await res.json(); if (body.detail) detail = String(body.detail); } catch (e) { /* not JSON */ }
    if (res.status === 429) {
      detail += " (retry after " + (res.headers.get("Retry-After") || "?") + " s)";
    }
    const err = new Error(detail);
    err.status = res.status;
    throw err;
  }
  return res;
}

function showError(message) { $("error").textContent = message; $("error").hidden = !message; }
function setStatus(text, fraction) {
  $("progress-box").hidden = false;
  $("status").textContent = text;
  if (fraction === null) $("progress").removeAttribute("value"); else $("progress").value = fraction;
}
function fmtPixels(n) { return n >= 1e6 ? (n / 1e6).toFixed(1) + " MP" : Math.round(n / 1e3) + " kP"; }
function clamp(v, lo, hi) { return Math.min(Math.max(v, lo), hi); }

// ---- controls from /v1/info ----------------------------------------------------------------------------

function offered(name) {
  const info = state.info;
  if (!info) return false;
  if (name === "lora") return Array.isArray(info.loras) && info.loras.length > 0;
  return Object.prototype.hasOwnProperty.call(info.defaults || {}, name);
}

function fillSelect(select, values, chosen, titles = {}) {
  const keep = select.value;
  select.replaceChildren(...values.map((v) => new Option(titles[v] || v, v)));
  select.value = values.includes(keep) ? keep : chosen;
}

async function loadInfo() {
  try {
    const info = await (await api("/v1/info")).json();
    state.info = info;
    const m = info.model || {};
    const lim = info.limits;
    $("model-info").textContent = `model ${m.model || "?"} on ${m.device || "?"} (${m.unet_dtype || "?"}) · sdx4 ${info.sdx4_version}` +
      ` · limits: ${fmtPixels(lim.max_input_pixels)} in, ${fmtPixels(lim.max_output_pixels)} out, ` +
      `${(lim.max_upload_bytes / 1048576).toFixed(0)} MiB upload, ${lim.formats.join("/")}`;
    $("random-warning").hidden = !m.random_weights;
    const d = info.defaults || {};
    const choices = info.choices || {};
    fillSelect($("method"), info.methods || choices.method || [d.method], d.method, METHOD_TITLES);
    for (const name of ["color_fix", "scheduler"]) fillSelect($(name), choices[name] || [], d[name]);
    const loras = offered("lora") ? info.loras : [];
    const byDefault = typeof d.lora === "string" ? ` (${d.lora.split(",").join(", ")})` : "";
    fillSelect($("lora"), ["", "none", ...loras.map((l) => l.name)], "",
      Object.fromEntries([["", "server default" + byDefault], ["none", "none (the base model)"],
        ...loras.map((l) => [l.name, `${l.name} (scale ${l.scale})`])]));
    for (const name of ["scale", "num_images", "steps", "guidance", "noise_level", "eta", "width", "height"]) {
      if ($(name).value === "" && d[name] !== null && d[name] !== undefined) $(name).value = d[name];
    }
    $("noise_level").max = m.max_noise_level ?? 350;
    for (const name of FIELDS) {
      const box = $(name).parentElement;
      if (box.tagName === "DIV") box.hidden = !offered(name) || (name !== "lora" && $(name).tagName === "SELECT" && !$(name).options.length);
    }
    $("key-box").hidden = !info.api_key_required || !!apiKey();
    showError("");
    applyMethod();
    updateRunButton();
  } catch (e) {
    $("model-info").textContent = "";
    showError(e.status === 401 ? "This server needs an API key: enter it above." : "Cannot reach the server: " + e.message);
  }
}

// The LoRAs a result's metadata says were merged (its "loras": name, sha256, scale), for people.
function loraText(loras) {
  if (!Array.isArray(loras) || !loras.length) return "no LoRA";
  return "LoRA " + loras.map((l) => `${l.name} ×${l.scale}`).join(", ");
}

function ignoredBy(method) {
  if (method === "sd") return [];
  if (method === "realesrgan") return [...MODEL_ONLY, "num_images"];  // one network pass, no randomness
  return [...MODEL_ONLY, "num_images", "color_fix"];  // classical filters: the input's colours already
}

function applyMethod() {
  const method = $("method").value;
  const ignored = ignoredBy(method);
  for (const name of FIELDS) if (name !== "method") $(name).disabled = ignored.includes(name);
  const shown = ignored.filter(offered).map((n) => $(n).labels[0].textContent.toLowerCase());
  $("ignored").textContent = shown.length ? `${method} ignores: ${shown.join(", ")}` : "";
  scheduleEstimate();
}

function formFields() {
  const out = [];
  for (const name of FIELDS) {
    const el = $(name);
    if (!offered(name) || el.disabled || el.value === "") continue;
    out.push([name, el.value]);
  }
  return out;
}

function updateRunButton() { $("run").disabled = !state.files.length || !state.info || !!state.batch; }

// ---- files ----------------------------------------------------------------------------------------------

// The output size shown beside each file: width/height when given (one of them keeps the aspect ratio),
// else scale x the input. The server's own answer is the estimate's `output_size` and the result.
function outputSize(w, h) {
  const given = (name) => (offered(name) && !$(name).disabled && $(name).value !== "" ? Number($(name).value) : null);
  const W = given("width"), H = given("height");
  if (W && H) return [W, H];
  if (W) return [W, Math.round((h * W) / w)];
  if (H) return [Math.round((w * H) / h), H];
  const s = Number($("scale").value) || 4;
  return [Math.round(w * s), Math.round(h * s)];
}

function isTiff(file) { return file.type === "image/tiff" || /\.tiff?$/i.test(file.name); }

async function chooseFiles(list) {
  const files = Array.from(list || []);
  if (!files.length) return;
  showError("");
  const lim = state.info && state.info.limits;
  const chosen = [], errors = [];
  for (const file of files) {
    if (lim && file.size > lim.max_upload_bytes) {
      errors.push(`${file.name}: ${(file.size / 1048576).toFixed(1)} MiB is over the upload limit of ${(lim.max_upload_bytes / 1048576).toFixed(0)} MiB; not queued`);
      continue;
    }
    try {
      const bitmap = await createImageBitmap(file);
      chosen.push({ file, w: bitmap.width, h: bitmap.height });
      bitmap.close();
    } catch (e) {
      // Chromium and Firefox cannot decode TIFF, which the server (Pillow) reads: let the server judge it.
      if (isTiff(file)) chosen.push({ file, w: null, h: null });
      else errors.push(`${file.name}: not an image the browser can read (${file.type || "unknown type"}); not queued`);
    }
  }
  state.files = chosen;
  showError(errors.join("\n"));
  describeFiles();
  const img = $("preview");
  const first = chosen.find((f) => f.w);
  if (first) {
    const url = URL.createObjectURL(first.file);
    if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
    img.src = url;
  }
  img.hidden = !first;
  $("drop-text").textContent = chosen.length ? "Drop other images or click to change" : "Drop images here or choose files";
  updateRunButton();
  scheduleEstimate();
}

function describeFiles() {
  const lim = state.info && state.info.limits;
  $("file-info").textContent = state.files.map(({ file, w, h }) => {
    if (!w) return `${file.name} (no preview in this browser; the server will check it)`;
    const [ow, oh] = outputSize(w, h);
    let text = `${file.name} · ${w}×${h} → ${ow}×${oh}`;
    if (lim && ow * oh > lim.max_output_pixels) text += ` — over this server's output limit (${fmtPixels(lim.max_output_pixels)})`;
    return text;
  }).join("\n");
}

// ---- the estimate (POST /v1/estimate; an older server answers 404: then the page shows nothing) --------

function scheduleEstimate() {
  clearTimeout(state.estimate.timer);
  state.estimate.timer = setTimeout(runEstimate, 300);
}

async function runEstimate() {
  const est = state.estimate, box = $("estimate");
  if (est.abort) est.abort.abort();
  const sized = state.files.filter((f) => f.w).slice(0, 8);
  if (est.absent || !state.info || !sized.length) { box.hidden = true; return; }
  est.abort = new AbortController();
  const signal = est.abort.signal;
  const lines = [];
  let bad = false;
  for (const f of sized) {
    const fd = new FormData();
    fd.append("input_width", String(f.w));
    fd.append("input_height", String(f.h));
    // the options as the job gets them: width/height (when set) are the output target, as in /v1/upscale
    for (const [k, v] of formFields()) fd.append(k, v);
    let res;
    try {
      res = await fetch("/v1/estimate", { method: "POST", body: fd, headers: headers(), signal });
    } catch (e) {
      if (e.name !== "AbortError") box.hidden = true;
      return;
    }
    if (res.status === 404) { est.absent = true; box.hidden = true; return; }
    let body = null;
    try { body = await res.json(); } catch (e) { /* not JSON */ }
    if (signal.aborted) return;
    const prefix = sized.length > 1 ? f.file.name + ": " : "";
    if (!res.ok || !body) {
      bad = true;
      lines.push(`${prefix}no estimate: ${(body && body.detail) || res.status + " " + res.statusText}`);
    } else {
      lines.push(prefix + body.summary);
    }
  }
  box.textContent = lines.join("\n");
  box.classList.toggle("bad", bad);
  box.hidden = false;
}

// ---- jobs -----------------------------------------------------------------------------------------------

// Read server-sent events through fetch (EventSource cannot send the API key header).
async function followEvents(jobId, onEvent, signal) {
  const res = await api(`/v1/jobs/${jobId}/events`, { signal });
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trim();
      }
      if (data && onEvent(event, JSON.parse(data)) === false) { reader.cancel(); return; }
    }
  }
}

function describe(job) {
  if (job.state === "queued") {
    if (job.queue_position === undefined || job.queue_position === null) return "queued";
    return job.queue_position === 0 ? "queued: next" : `queued: ${job.queue_position} job(s) ahead`;
  }
  if (job.state === "running") return job.cancel_requested ? "cancelling…" : (job.total > 1 ? `step ${job.step} of ${job.total}` : "running…");
  if (job.state === "done") return job.metadata && job.metadata.seconds !== undefined ? `done in ${job.metadata.seconds} s` : "done";
  if (job.state === "failed") return "failed: " + job.error;
  if (job.state === "cancelled") return "cancelled: " + job.error;
  return job.state;
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props);
  node.append(...children);
  return node;
}

function addJob(snap, entry, method) {
  const job = { id: snap.id, name: entry.file.name, file: entry.file, method, snap, urls: [], filenames: [] };
  const row = el("li", { id: "job-" + snap.id });
  row.dataset.state = snap.state;
  job.row = row;
  job.stateText = el("span", { className: "state" });
  job.progress = el("progress", { max: 1, value: 0 });
  job.progress.setAttribute("aria-label", "progress of " + job.name);
  job.actions = el("div", { className: "actions" });
  const cancelButton = el("button", { type: "button", className: "secondary cancel", textContent: "Cancel" });
  cancelButton.setAttribute("aria-label", "cancel " + job.name);
  cancelButton.addEventListener("click", () => cancelJobs([job]));
  job.actions.append(cancelButton);
  row.append(el("span", { className: "name", textContent: job.name }), job.actions, job.stateText, job.progress);
  $("jobs").prepend(row);
  $("jobs-panel").hidden = false;
  state.jobs.set(job.id, job);
  updateRow(job, snap);
  return job;
}

function updateRow(job, snap) {
  job.snap = { ...job.snap, ...snap };
  const s = job.snap;
  job.row.dataset.state = s.state;
  job.stateText.textContent = describe(s);
  job.progress.value = s.state === "done" ? 1 : (s.progress || 0);
  const cancel = job.actions.querySelector(".cancel");
  if (cancel) cancel.hidden = FINISHED.includes(s.state);
}

async function pollJobs(batch) {
  try {
    const list = await (await api("/v1/jobs?limit=100")).json();
    for (const item of list.jobs) {
      const job = state.jobs.get(item.id);
      if (job && batch.jobs.includes(job) && job !== batch.following && !FINISHED.includes(job.snap.state)) {
        updateRow(job, item);
      }
    }
  } catch (e) { /* the events stream reports the followed job; the list is only for the queued ones */ }
}

function filenameOf(res, fallback) {
  const m = /filename="([^"]+)"/.exec(res.headers.get("Content-Disposition") || "");
  return m ? m[1] : fallback;
}

async function follow(job, batch) {
  const many = batch.jobs.length > 1;
  const label = (text) => (many ? `${job.name}: ${text}` : text);
  let final = job.snap;
  batch.following = job;
  if (!FINISHED.includes(final.state)) {
    setStatus(label(describe(final)), final.progress || 0);
    await followEvents(job.id, (name, data) => {
      final = data;
      updateRow(job, data);
      setStatus(label(describe(data)), data.progress);
      return !FINISHED.includes(name);
    }, batch.abort.signal);
    if (!FINISHED.includes(final.state)) {
      final = await (await api(`/v1/jobs/${job.id}`)).json();  // the stream ended early: ask once more
    }
  }
  updateRow(job, final);
  if (final.state === "failed") throw new Error(label("the job failed: " + final.error));
  if (final.state === "cancelled") throw new Error(label("cancelled: " + final.error));
  if (final.state !== "done") throw new Error(label("the job is " + final.state));
  for (const [i, url] of final.result_urls.entries()) {
    const res = await api(url);
    job.urls.push(URL.createObjectURL(await res.blob()));
    job.filenames.push(filenameOf(res, `upscaled_${i}.png`));
  }
  const show = el("button", { type: "button", className: "show", textContent: "Compare" });
  show.setAttribute("aria-label", "compare " + job.name);
  show.addEventListener("click", () => showResult(job));
  job.actions.append(show);
  job.urls.forEach((url, i) => {
    const a = el("a", { className: "button download", href: url, download: job.filenames[i],
      textContent: job.urls.length > 1 ? `PNG ${i + 1}` : "Download" });
    a.setAttribute("aria-label", `download ${job.filenames[i]}`);
    job.actions.append(a);
  });
  job.batch = batch;
  if (!state.shown || state.shown.batch !== batch) await showResult(job);
  if (!many) setStatus(describe(final), 1);
}

async function run(event) {
  event.preventDefault();
  if (!state.files.length || state.batch) return;
  showError("");
  const fields = formFields();
  const method = $("method").value;
  const batch = { jobs: [], abort: new AbortController(), following: null };
  state.batch = batch;
  updateRunButton();
  setStatus("uploading…", null);
  const errors = [];
  for (const entry of state.files) {
    const fd = new FormData();
    fd.append("image", entry.file, entry.file.name);
    for (const [k, v] of fields) fd.append(k, v);
    try {
      const snap = await (await api("/v1/jobs", { method: "POST", body: fd })).json();
      batch.jobs.push(addJob(snap, entry, method));
    } catch (e) {
      errors.push(e.message.startsWith(entry.file.name) ? e.message : `${entry.file.name}: ${e.message}`);
      if (e.status === 401) break;
    }
  }
  if (batch.jobs.length) $("cancel").hidden = false;
  const poll = setInterval(() => pollJobs(batch), 1000);
  try {
    for (const job of batch.jobs) {
      try { await follow(job, batch); } catch (e) { errors.push(e.message); }
    }
  } finally {
    clearInterval(poll);
    state.batch = null;
    $("cancel").hidden = true;
    updateRunButton();
  }
  const done = batch.jobs.filter((j) => j.snap.state === "done").length;
  if (batch.jobs.length > 1) setStatus(`${done} of ${batch.jobs.length} jobs done`, done / batch.jobs.length);
  else if (!done) $("progress-box").hidden = true;
  showError(errors.join("\n"));
}

async function cancelJobs(jobs) {
  const open = jobs.filter((j) => !FINISHED.includes(j.snap.state));
  try {
    for (const job of open) await api(`/v1/jobs/${job.id}`, { method: "DELETE" });
    if (open.length && state.batch && open.includes(state.batch.following)) setStatus("cancelling…", null);
  } catch (e) { showError(e.message); }
}

// ---- the comparison: fitted slider and the loupe ----------------------------------------------------------

async function drawBefore() {
  const shown = state.shown;
  if (!shown) return;
  const [w, h] = shown.size;
  let bitmap = null;
  try { bitmap = await createImageBitmap(shown.file); } catch (e) { /* TIFF: no before side in this browser */ }
  for (const id of ["before", "loupe-before", "before-tag", "loupe-before-tag"]) $(id).hidden = !bitmap;
  if (!bitmap) return;
  const nearest = $("before-filter").value === "nearest";
  for (const id of ["before", "loupe-before"]) {
    const canvas = $(id);
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = !nearest;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(bitmap, 0, 0, w, h);
  }
  bitmap.close();
  const tag = `input, ${nearest ? "nearest" : "smooth"}`;
  $("before-tag").textContent = tag;
  $("loupe-before-tag").textContent = tag;
}

async function showResult(job) {
  const [w, h] = job.snap.output_size;
  state.shown = { job, file: job.file, size: [w, h], batch: job.batch };
  const after = $("after"), loupeAfter = $("loupe-after");
  const loaded = Promise.all([after, loupeAfter].map((img) => new Promise((resolve) => {
    img.onload = img.onerror = resolve;
  })));
  after.src = job.urls[0];
  loupeAfter.src = job.urls[0];
  const name = job.method === "sd" ? "sdx4" : job.method;
  $("after-tag").textContent = name;
  $("loupe-after-tag").textContent = name;
  const m = job.snap.metadata || {};
  $("result-info").textContent = `${job.name} · ${w}×${h}` + (m.seed !== undefined && m.seed !== null ? ` · seed ${m.seed}` : "") +
    (m.steps ? ` · ${m.steps} steps · guidance ${m.guidance} · noise ${m.noise_level}` : "") +
    (m.steps && offered("lora") ? " · " + loraText(m.loras) : "") + ` · ${m.seconds} s`;
  const link = $("download");
  link.href = job.urls[0];
  link.download = job.filenames[0];
  $("result-panel").hidden = false;
  await drawBefore();
  await loaded;
  setSlider(50);
  state.loupe.cx = w / 2;
  state.loupe.cy = h / 2;
  setZoom(state.loupe.zoom);
}

function setSlider(pos) {
  $("before").style.clipPath = `inset(0 ${100 - pos}% 0 0)`;
  $("divider").style.left = pos + "%";
}

function setZoom(zoom, cx, cy) {
  const L = state.loupe;
  L.zoom = zoom;
  for (const b of document.querySelectorAll("button.zoom")) b.setAttribute("aria-pressed", String(b.dataset.zoom === String(zoom)));
  const fit = zoom === "fit";
  $("compare").hidden = !fit;
  $("loupe").hidden = fit;
  if (fit) { $("loupe-info").textContent = "double-click the image or press 1 to look at 1:1"; return; }
  if (cx !== undefined) { L.cx = cx; L.cy = cy; }
  applyLoupe();
}

// Both panes show the same region: one centre (cx, cy) in output pixels, one transform for both images.
function applyLoupe() {
  const L = state.loupe, shown = state.shown;
  if (!shown || L.zoom === "fit") return;
  const [w, h] = shown.size, z = L.zoom, pane = $("pane-after");
  const vw = pane.clientWidth / z, vh = pane.clientHeight / z;  // the region in view, output pixels
  // An image smaller than the view is centred, and keeps the centre asked for (for the next zoom in).
  L.cx = w <= vw ? clamp(L.cx, 0, w) : clamp(L.cx, vw / 2, w - vw / 2);
  L.cy = h <= vh ? clamp(L.cy, 0, h) : clamp(L.cy, vh / 2, h - vh / 2);
  const cx = w <= vw ? w / 2 : L.cx, cy = h <= vh ? h / 2 : L.cy;
  // Whole screen pixels, so 1:1 stays sharp.
  const tx = Math.round((vw / 2 - cx) * z), ty = Math.round((vh / 2 - cy) * z);
  L.x = -tx / z;
  L.y = -ty / z;
  const transform = `translate(${tx}px, ${ty}px) scale(${z})`;
  for (const id of ["loupe-before", "loupe-after"]) {
    const node = $(id);
    node.style.width = w + "px";
    node.style.height = h + "px";
    node.style.transform = transform;
  }
  const x0 = Math.max(0, Math.round(L.x)), y0 = Math.max(0, Math.round(L.y));
  const x1 = Math.min(w, Math.round(L.x + vw)), y1 = Math.min(h, Math.round(L.y + vh));
  $("loupe-info").textContent = `${z === 1 ? "1:1" : z + "x"} · pixels ${x0}–${x1} × ${y0}–${y1} of ${w}×${h}` +
    " · drag or use the arrow keys to pan, + and − to zoom, 0 to fit";
}

function zoomStep(direction) {
  const L = state.loupe;
  const i = L.zoom === "fit" ? -1 : ZOOMS.indexOf(L.zoom);
  const next = i + direction;
  setZoom(next < 0 ? "fit" : ZOOMS[Math.min(next, ZOOMS.length - 1)]);
}

function onKey(e) {
  if (!state.shown || e.altKey || e.ctrlKey || e.metaKey) return;
  const L = state.loupe;
  const keys = { "0": "fit", "1": 1, "2": 2, "4": 4 };
  if (e.key in keys) setZoom(keys[e.key]);
  else if (e.key === "+" || e.key === "=") zoomStep(1);
  else if (e.key === "-") zoomStep(-1);
  else if (L.zoom !== "fit" && e.key.startsWith("Arrow")) {
    const pane = $("pane-after"), f = e.shiftKey ? 0.5 : 0.1;
    const dx = (pane.clientWidth / L.zoom) * f, dy = (pane.clientHeight / L.zoom) * f;
    if (e.key === "ArrowLeft") L.cx -= dx;
    if (e.key === "ArrowRight") L.cx += dx;
    if (e.key === "ArrowUp") L.cy -= dy;
    if (e.key === "ArrowDown") L.cy += dy;
    applyLoupe();
  } else return;
  e.preventDefault();
}

function initLoupe() {
  const loupe = $("loupe");
  loupe.addEventListener("pointerdown", (e) => {
    const pane = e.target.closest(".pane");
    if (!pane) return;
    pane.setPointerCapture(e.pointerId);
    pane.classList.add("dragging");
    state.drag = { pane, x: e.clientX, y: e.clientY, cx: state.loupe.cx, cy: state.loupe.cy };
    loupe.focus();
  });
  loupe.addEventListener("pointermove", (e) => {
    const d = state.drag;
    if (!d) return;
    const z = state.loupe.zoom;
    state.loupe.cx = d.cx - (e.clientX - d.x) / z;
    state.loupe.cy = d.cy - (e.clientY - d.y) / z;
    applyLoupe();
  });
  const end = () => { if (state.drag) state.drag.pane.classList.remove("dragging"); state.drag = null; };
  loupe.addEventListener("pointerup", end);
  loupe.addEventListener("pointercancel", end);
  $("result-panel").addEventListener("keydown", (e) => { if (e.target.id !== "before-filter") onKey(e); });
  for (const b of document.querySelectorAll("button.zoom")) {
    b.addEventListener("click", () => setZoom(b.dataset.zoom === "fit" ? "fit" : Number(b.dataset.zoom)));
  }
  $("compare").addEventListener("dblclick", (e) => {
    const r = $("compare").getBoundingClientRect(), [w, h] = state.shown.size;
    setZoom(1, ((e.clientX - r.left) / r.width) * w, ((e.clientY - r.top) / r.height) * h);
    loupe.focus();
  });
  $("before-filter").addEventListener("change", drawBefore);
  window.addEventListener("resize", applyLoupe);
}

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => chooseFiles(e.target.files));
  for (const name of ["dragenter", "dragover"]) drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const name of ["dragleave", "drop"]) drop.addEventListener(name, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); chooseFiles(e.dataTransfer.files); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  $("options").addEventListener("submit", run);
  $("options").addEventListener("input", () => { describeFiles(); scheduleEstimate(); });
  $("method").addEventListener("change", applyMethod);
  $("cancel").addEventListener("click", () => { if (state.batch) cancelJobs(state.batch.jobs); });
  $("slider").addEventListener("input", (e) => setSlider(Number(e.target.value)));
  $("key-save").addEventListener("click", () => { sessionStorage.setItem("sdx4-api-key", $("api-key").value.trim()); loadInfo(); });
  initLoupe();
  loadInfo();
}

document.addEventListener("DOMContentLoaded", init);
