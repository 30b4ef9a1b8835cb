// sdx4 web page: plain JavaScript, no build step, no external resources.
// Flow: pick/drop image -> POST /v1/jobs (the chosen method) and POST /v1/upscale (method=bicubic, the
// "before" image) -> progress from GET /v1/jobs/{id}/events (server-sent events read with fetch, so the
// API key header can be sent) -> GET /v1/jobs/{id}/result -> before/after slider + download link.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { file: null, info: null, jobId: null, abort: null, urls: [] };
const OPTION_FIELDS = ["prompt", "negative_prompt", "method", "steps", "guidance", "noise_level", "seed", "eta", "scheduler"];

function apiKey() { return sessionStorage.getItem("sdx4-api-key") || ""; }
function headers() { const k = apiKey(); return k ? { "Authorization": "Bearer " + k } : {}; }

async function api(path, options = {}) {
  const res = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (res.status === 401) { $("key-box").hidden = false; }
  if (!res.ok) {
    let detail = res.status + " " + res.statusText;
    try { const body = await res.json(); if (body.detail) detail = body.detail; } catch (e) { /* not JSON */ }
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
    const d = info.defaults;
    for (const name of ["steps", "guidance", "noise_level", "eta"]) { if ($(name).value === "") $(name).value = d[name]; }
    $("noise_level").max = m.max_noise_level ?? 350;
    const schedulers = (info.choices || {}).scheduler || [];
    const select = $("scheduler");
    if (!select.options.length) {
      for (const name of schedulers) select.add(new Option(name, name, name === d.scheduler, name === d.scheduler));
    }
    select.parentElement.hidden = !schedulers.length;  // an older server without the option
    $("key-box").hidden = !info.api_key_required || !!apiKey();
    showError("");
    updateRunButton();
  } catch (e) {
    $("model-info").textContent = "";
    showError(e.status === 401 ? "This server needs an API key: enter it above." : "Cannot reach the server: " + e.message);
  }
}

function updateRunButton() { $("run").disabled = !state.file || !state.info || !!state.jobId; }

function chooseFile(file) {
  showError("");
  if (!file) return;
  const lim = state.info && state.info.limits;
  if (lim && file.size > lim.max_upload_bytes) {
    showError(`${file.name}: ${(file.size / 1048576).toFixed(1)} MiB is over the upload limit of ${(lim.max_upload_bytes / 1048576).toFixed(0)} MiB`);
    return;
  }
  state.file = file;
  const url = URL.createObjectURL(file);
  state.urls.push(url);
  const img = $("preview");
  img.onload = () => {
    const w = img.naturalWidth, h = img.naturalHeight;
    let text = `${file.name} · ${w}×${h} → ${4 * w}×${4 * h}`;
    if (lim && 16 * w * h > lim.max_output_pixels) text += ` — over this server's output limit (${fmtPixels(lim.max_output_pixels)})`;
    $("file-info").textContent = text;
  };
  img.onerror = () => { $("file-info").textContent = `${file.name} (the browser cannot preview it; the server will check it)`; };
  img.src = url;
  img.hidden = false;
  $("drop-text").textContent = "Drop another image or click to change";
  updateRunButton();
}

function formData(method) {
  const fd = new FormData();
  fd.append("image", state.file, state.file.name);
  for (const name of OPTION_FIELDS) {
    let value = name === "method" ? method : $(name).value;
    if (name === "seed" && value === "") continue;  // no seed: the server draws one and reports it
    if (name === "scheduler" && !value) continue;
    fd.append(name, value);
  }
  return fd;
}

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
      if (data && onEvent(event, JSON.parse(data)) === false) return;
    }
  }
}

function describe(job) {
  if (job.state === "queued") return job.queue_position === 0 ? "queued: next" : `queued: ${job.queue_position} job(s) ahead`;
  if (job.state === "running") return job.cancel_requested ? "cancelling…" : (job.total > 1 ? `step ${job.step} of ${job.total}` : "running…");
  return job.state;
}

async function blobUrl(res) { const url = URL.createObjectURL(await res.blob()); state.urls.push(url); return url; }

function filenameOf(res, fallback) {
  const m = /filename="([^"]+)"/.exec(res.headers.get("Content-Disposition") || "");
  return m ? m[1] : fallback;
}

async function run(event) {
  event.preventDefault();
  if (!state.file) return;
  showError("");
  $("result-panel").hidden = true;
  const method = $("method").value;
  state.abort = new AbortController();
  let job;
  try {
    setStatus("uploading…", null);
    job = await (await api("/v1/jobs", { method: "POST", body: formData(method) })).json();
  } catch (e) {
    $("progress-box").hidden = true;
    showError(e.message);
    return;
  }
  state.jobId = job.id;
  updateRunButton();
  $("cancel").hidden = false;
  // The "before" image: the server's own bicubic upscale (same filter as `sdx4 upscale --method bicubic`).
  const before = api("/v1/upscale", { method: "POST", body: formData("bicubic"), signal: state.abort.signal })
    .then(blobUrl).catch((e) => { console.warn("bicubic comparison failed:", e.message); return null; });
  let final = job;
  try {
    setStatus(describe(job), 0);
    await followEvents(job.id, (name, data) => {
      final = data;
      setStatus(describe(data), data.progress);
      return !["done", "failed", "cancelled"].includes(name);
    }, state.abort.signal);
    if (final.state !== "done") {
      final = await (await api(`/v1/jobs/${job.id}`)).json();  // the stream ended early: ask once more
    }
    if (final.state === "failed") throw new Error("the job failed: " + final.error);
    if (final.state === "cancelled") throw new Error("cancelled: " + final.error);
    if (final.state !== "done") throw new Error("the job is " + final.state);
    const res = await api(final.result_urls[0]);
    const afterUrl = await blobUrl(res);
    const beforeUrl = await before;
    showResult(final, afterUrl, beforeUrl, filenameOf(res, "upscaled_x4.png"), method);
    setStatus(`done in ${final.metadata.seconds} s`, 1);
  } catch (e) {
    showError(e.message);
    $("progress-box").hidden = true;
  } finally {
    state.jobId = null;
    $("cancel").hidden = true;
    updateRunButton();
  }
}

function showResult(job, afterUrl, beforeUrl, filename, method) {
  $("after").src = afterUrl;
  $("before").hidden = !beforeUrl;
  $("before-tag").hidden = !beforeUrl;
  if (beforeUrl) $("before").src = beforeUrl;
  $("after-tag").textContent = method === "sd" ? "sdx4" : method;
  const [w, h] = job.output_size;
  const m = job.metadata;
  $("result-info").textContent = `${w}×${h}` + (m.seed !== undefined ? ` · seed ${m.seed}` : "") +
    (m.steps ? ` · ${m.steps} steps · guidance ${m.guidance} · noise ${m.noise_level}` : "") + ` · ${m.seconds} s`;
  const link = $("download");
  link.href = afterUrl;
  link.download = filename;
  $("result-panel").hidden = false;
  setSlider(50);
}

function setSlider(pos) {
  $("before").style.clipPath = `inset(0 ${100 - pos}% 0 0)`;
  $("divider").style.left = pos + "%";
}

async function cancel() {
  if (!state.jobId) return;
  try {
    await api(`/v1/jobs/${state.jobId}`, { method: "DELETE" });
    setStatus("cancelling…", null);
  } catch (e) { showError(e.message); }
}

function init() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => chooseFile(e.target.files[0]));
  for (const name of ["dragenter", "dragover"]) drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const name of ["dragleave", "drop"]) drop.addEventListener(name, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); chooseFile(e.dataTransfer.files[0]); });
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  $("options").addEventListener("submit", run);
  $("cancel").addEventListener("click", cancel);
  $("slider").addEventListener("input", (e) => setSlider(Number(e.target.value)));
  $("method").addEventListener("change", () => {
    const sd = $("method").value === "sd";
    for (const name of ["prompt", "negative_prompt", "steps", "guidance", "noise_level", "seed", "eta", "scheduler"]) $(name).disabled = !sd;
  });
  $("key-save").addEventListener("click", () => { sessionStorage.setItem("sdx4-api-key", $("api-key").value.trim()); loadInfo(); });
  loadInfo();
}

document.addEventListener("DOMContentLoaded", init);
