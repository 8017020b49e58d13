// The imgclf web page: show the served model, classify an uploaded or drawn image.
// Plain browser JavaScript, no build step and nothing fetched from elsewhere, so it works offline.
"use strict";

const TOP_K = 5;
const TOKEN_KEY = "imgclf.token";
// Relative URLs, so the page also works when a proxy serves it under a path prefix.
const MODEL_URL = "v1/model";
const PREDICT_URL = "v1/predict";
const MONITOR_URL = "v1/monitor";
const MONITOR_EVERY_MS = 30000;
const CAPTURES_URL = "v1/captures";
const FEEDBACK_URL = "v1/feedback";
const CAPTURES_SHOWN = 24;

const $ = (id) => document.getElementById(id);

const state = {
  source: null, // "file" or "canvas": what Predict sends
  file: null,
  modelLoaded: false,
  modelVersion: null, // the version the page shows; an answer from another one reloads the card
  request: 0, // increases per prediction; an older answer arriving late is dropped
  retry: null, // the prediction to run again once a token is given
  classes: [], // the served model's: what a captured image may be labelled
};

class AuthRequired extends Error {}

// ---- HTTP -------------------------------------------------------------------------------

async function api(url, options = {}) {
  const headers = new Headers(options.headers);
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.set("Authorization", `Bearer ${token}`);
  let response;
  try {
    response = await fetch(url, { ...options, headers });
  } catch (error) {
    throw new Error(`Cannot reach the server (${error.message})`);
  }
  const body = await response.json().catch(() => null);
  if (response.status === 401) {
    showAuth(token ? "The token was refused; enter another." : errorText(response, body));
    throw new AuthRequired();
  }
  if (!response.ok) throw new Error(errorText(response, body));
  noteVersion(response.headers.get("X-Model-Version"));
  return body;
}

// `imgclf serve` following an alias swaps the model without a restart: a prediction made by
// another version than the one shown reloads the model card, so the page never shows a stale one.
function noteVersion(version) {
  if (version && state.modelVersion !== null && version !== state.modelVersion) loadModel();
}

// FastAPI says why in `detail`: a string, or a list of validation errors.
function errorText(response, body) {
  const detail = body && body.detail;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) return detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
  return `The server answered ${response.status} ${response.statusText}`.trim();
}

// ---- Model card -------------------------------------------------------------------------

async function loadModel() {
  try {
    showModel(await api(MODEL_URL));
    state.modelLoaded = true;
    loadMonitor();
    loadCaptures();
  } catch (error) {
    if (error instanceof AuthRequired) {
      $("model-name").textContent = "token needed";
    } else {
      $("model-name").textContent = "unavailable";
      showError(`Could not load the model: ${error.message}`);
    }
  }
}

function showModel(card) {
  const name = card.name || "unnamed model";
  $("model-name").textContent = name;
  $("model-version").textContent = describeVersion(card);
  state.modelVersion = card.version == null ? null : String(card.version);
  $("model-input").textContent = describeInput(card.input);
  $("model-classes").textContent = describeClasses(card.classes);
  state.classes = Array.isArray(card.classes) ? card.classes.map(String) : [];
  document.title = `imgclf · ${name}`;
}

// A registry version with its alias ("3 @champion"), or whatever the server calls the version.
function describeVersion(card) {
  if (card.version == null) return "—";
  const alias = card.registry && card.registry.alias;
  return alias ? `${card.version} @${alias}` : String(card.version);
}

function describeInput(input) {
  if (!input) return "—";
  const shape = Array.isArray(input.shape) ? input.shape : [];
  const [height, width] = input.size || shape.slice(-2);
  const mode = { L: "greyscale", RGB: "colour" }[input.mode] || input.mode || "";
  return [height && width ? `${width}×${height}` : "", mode].filter(Boolean).join(" ") || "—";
}

function describeClasses(classes) {
  if (!Array.isArray(classes) || classes.length === 0) return "—";
  const shown = 20;
  if (classes.length <= shown) return classes.join(", ");
  return `${classes.slice(0, shown).join(", ")}, … (${classes.length} in all)`;
}

// ---- Token ------------------------------------------------------------------------------

function showAuth(message) {
  $("auth-message").textContent = message;
  $("auth").hidden = false;
  $("token").focus();
}

function saveToken(event) {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  $("auth").hidden = true;
  if (!state.modelLoaded) loadModel();
  const retry = state.retry;
  state.retry = null;
  if (retry) retry();
}

// ---- Choosing what to classify ----------------------------------------------------------

function useSource(source) {
  state.source = source;
  for (const panel of document.querySelectorAll(".panel")) {
    panel.classList.toggle("active", panel.dataset.source === source);
  }
  $("predict").disabled = source === null;
  $("source").textContent = {
    file: state.file ? `Will classify ${state.file.name}.` : "",
    canvas: "Will classify the drawing.",
  }[source] || "Choose or draw an image first.";
}

function chooseFile(file) {
  if (!file) return;
  state.file = file;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-text").hidden = true;
  useSource("file");
}

// A file the browser cannot show (TIFF, or not an image at all) is still sent: the server decides.
function previewFailed() {
  $("preview").hidden = true;
  $("drop-text").textContent = state.file ? state.file.name : "";
  $("drop-text").hidden = false;
}

function setUpUpload() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => chooseFile(event.target.files[0]));
  // Back to the chosen file after drawing: picking the same file again fires no "change".
  const reselect = () => state.file && useSource("file");
  $("upload-panel").addEventListener("pointerdown", reselect);
  $("preview").addEventListener("error", previewFailed);
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    chooseFile(event.dataTransfer.files[0]);
  });
}

// ---- Drawing: light strokes on a dark ground, as in digit data sets ----------------------

function setUpCanvas() {
  const canvas = $("canvas");
  const context = canvas.getContext("2d");
  let last = null;

  const clear = () => {
    context.fillStyle = "#000";
    context.fillRect(0, 0, canvas.width, canvas.height);
  };
  // Pointer position in canvas pixels; the canvas may be displayed smaller than it is.
  const at = (event) => {
    const box = canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - box.left) * canvas.width) / box.width,
      y: ((event.clientY - box.top) * canvas.height) / box.height,
    };
  };
  const line = (from, to) => {
    context.beginPath();
    context.moveTo(from.x, from.y);
    context.lineTo(to.x, to.y);
    context.stroke();
  };

  clear();
  context.strokeStyle = "#fff";
  // About a tenth of the side: a pen stroke's share of the frame in MNIST-like digits.
  context.lineWidth = canvas.width / 10;
  context.lineCap = "round";
  context.lineJoin = "round";

  // Pointer events cover mouse, pen and touch; CSS touch-action stops touch from scrolling.
  canvas.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    canvas.setPointerCapture(event.pointerId);
    last = at(event);
    line(last, last); // a tap leaves a dot
    useSource("canvas");
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!last) return;
    const point = at(event);
    line(last, point);
    last = point;
  });
  const end = () => {
    if (!last) return;
    last = null;
    if ($("live").checked) predict();
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);

  $("clear").addEventListener("click", () => {
    clear();
    if (state.source === "canvas") useSource(state.file ? "file" : null);
  });
}

function canvasImage() {
  return new Promise((resolve) => $("canvas").toBlob(resolve, "image/png"));
}

// ---- Prediction -------------------------------------------------------------------------

async function predict() {
  if (!state.source) return;
  const request = ++state.request;
  const form = new FormData();
  if (state.source === "file") form.append("file", state.file, state.file.name);
  else form.append("file", await canvasImage(), "drawing.png");

  $("result").setAttribute("aria-busy", "true");
  const started = performance.now();
  try {
    const body = await api(PREDICT_URL, { method: "POST", body: form });
    if (request !== state.request) return;
    const prediction = body && Array.isArray(body.predictions) ? body.predictions[0] : null;
    if (!prediction) throw new Error("The server's answer held no prediction");
    hideError();
    showPrediction(prediction, performance.now() - started);
    loadMonitor(); // this image may have completed a window
    // The server may have kept this image to be labelled; it writes it in the background.
    setTimeout(loadCaptures, 500);
  } catch (error) {
    if (request !== state.request) return;
    if (error instanceof AuthRequired) state.retry = predict;
    else showError(error.message);
  } finally {
    if (request === state.request) $("result").removeAttribute("aria-busy");
  }
}

function showPrediction(prediction, milliseconds) {
  const ranked = Object.entries(prediction.probabilities || {})
    .sort((a, b) => b[1] - a[1])
    .slice(0, TOP_K);
  const top = ranked.find(([label]) => label === String(prediction.label));

  $("label").textContent = prediction.label;
  $("confidence").textContent = top ? percent(top[1]) : "";
  $("bars").replaceChildren(...ranked.map(([label, p]) => bar(label, p, label === top?.[0])));
  $("timing").textContent = `Answered in ${Math.round(milliseconds)} ms.`;
  $("result").hidden = false;
}

function bar(label, probability, isBest) {
  const item = document.createElement("li");
  item.className = isBest ? "bar best" : "bar";
  item.dataset.label = label;
  item.dataset.probability = String(probability);

  const name = document.createElement("span");
  name.className = "bar-label";
  name.textContent = label;

  const track = document.createElement("span");
  track.className = "bar-track";
  const fill = document.createElement("span");
  fill.className = "bar-fill";
  fill.style.width = `${Math.max(0, Math.min(1, probability)) * 100}%`;
  track.append(fill);

  const value = document.createElement("span");
  value.className = "bar-value";
  value.textContent = percent(probability);

  item.append(name, track, value);
  return item;
}

function percent(p) {
  const value = p * 100;
  return `${value >= 99.95 || value < 0.05 ? value.toFixed(0) : value.toFixed(1)}%`;
}

// ---- Labelling what the server kept (imgclf serve --capture DIR) ------------------------

// The section stays hidden when the server keeps nothing or the token is not given yet.
async function loadCaptures() {
  let body;
  try {
    body = await api(`${CAPTURES_URL}?limit=${CAPTURES_SHOWN}`);
  } catch (error) {
    body = null;
  }
  if (!body || !body.enabled) {
    $("labelling").hidden = true;
    return;
  }
  const shown = body.captures.filter((c) => !$("captures").querySelector(`[data-sha256="${c.sha256}"]`));
  for (const item of $("captures").querySelectorAll(".capture")) {
    if (!body.captures.some((c) => c.sha256 === item.dataset.sha256)) item.remove();
  }
  $("captures").append(...shown.map(captureItem));
  showWaiting(body.waiting);
  $("labelling").hidden = false;
}

function showWaiting(waiting) {
  $("captures-count").textContent =
    waiting === 0 ? "Nothing to label." : `${waiting} image${waiting === 1 ? "" : "s"} to label.`;
}

function captureItem(capture) {
  const item = document.createElement("li");
  item.className = "capture";
  item.dataset.sha256 = capture.sha256;

  const image = document.createElement("img");
  image.alt = `Captured image, the model said ${capture.label}`;
  loadCapturedImage(capture.sha256, image);

  const guess = document.createElement("span");
  guess.className = "guess";
  const p = capture.probability == null ? "" : ` (${percent(capture.probability)})`;
  guess.textContent = `Model: ${capture.label}${p}`;

  const select = document.createElement("select");
  select.setAttribute("aria-label", "The right class");
  const prompt = new Option("The right class…", "");
  prompt.disabled = true;
  prompt.selected = true;
  select.append(prompt, ...state.classes.map((label) => new Option(label, label)));

  const button = document.createElement("button");
  button.type = "button";
  button.className = "label-button";
  button.textContent = "Label";
  button.disabled = true;
  select.addEventListener("change", () => (button.disabled = !select.value));
  button.addEventListener("click", () => sendLabel(item, capture.sha256, select.value));

  item.append(image, guess, select, button);
  return item;
}

// The image needs the token too: fetched with it, shown from a blob URL.
async function loadCapturedImage(sha256, image) {
  const headers = new Headers();
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.set("Authorization", `Bearer ${token}`);
  try {
    const response = await fetch(`${CAPTURES_URL}/${sha256}`, { headers });
    if (response.ok) image.src = URL.createObjectURL(await response.blob());
  } catch (error) {
    image.alt = "The image could not be loaded";
  }
}

async function sendLabel(item, sha256, label) {
  if (!label) return;
  try {
    await api(FEEDBACK_URL, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sha256, label }),
    });
  } catch (error) {
    if (!(error instanceof AuthRequired)) showError(`Could not label the image: ${error.message}`);
    return;
  }
  const image = item.querySelector("img");
  if (image.src) URL.revokeObjectURL(image.src);
  item.remove();
  loadCaptures();
}

// ---- Messages ---------------------------------------------------------------------------

// An error replaces the last result, which belonged to another image.
function showError(message) {
  $("result").hidden = true;
  $("error").textContent = message;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ---- Drift monitor: one line, "no drift" or "drift in <signal> since <time>" ---------------

async function loadMonitor() {
  try {
    $("model-drift").textContent = describeDrift(await api(MONITOR_URL));
  } catch (error) {
    $("model-drift").textContent = error instanceof AuthRequired ? "token needed" : "unavailable";
  }
}

function describeDrift(monitor) {
  if (!monitor.active) return monitor.note ? `monitor ${monitor.note}` : "monitor off";
  if (monitor.drift && monitor.drift.length) {
    const since = (entry) => `${entry.signal} since ${new Date(entry.since).toLocaleString()}`;
    return `drift in ${monitor.drift.map(since).join(", ")}`;
  }
  if (!monitor.windows_total) {
    return `no drift (first window: ${monitor.images_in_window} of ${monitor.window} images)`;
  }
  return "no drift";
}

// ---- Start ------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  setUpUpload();
  setUpCanvas();
  $("predict").addEventListener("click", predict);
  $("auth").addEventListener("submit", saveToken);
  $("captures-refresh").addEventListener("click", loadCaptures);
  loadModel();
  setInterval(() => state.modelLoaded && loadMonitor(), MONITOR_EVERY_MS);
});
