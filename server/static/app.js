// The playground: plain JavaScript, no build step. It talks to the native API (/v1/generate)
// and the edits API (/v1/images/edits) with streaming, so every tile fills in from the
// server's previews as the grid is generated.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "llamagen.apiKey";
const edit = { blob: null, grid: 16 };  // the image to edit, the model's token grid

function authHeaders() {
  const key = $("apikey").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function headers() {
  return { "Content-Type": "application/json", ...authHeaders() };
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function apiError(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    showError(await apiError(response));
    return;
  }
  showError("");
  const select = $("model");
  const current = select.value;
  select.replaceChildren();
  adapters = [];
  for (const model of (await response.json()).data) {
    // A LoRA adapter names its base model as `parent`: it goes in the adapter picker.
    if (model.parent) {
      adapters.push(model);
      continue;
    }
    const option = new Option(`${model.id} (${model.image_size}px)`, model.id);
    option.dataset.task = model.task;
    option.dataset.grid = model.grid_size;
    select.append(option);
  }
  if (current) select.value = current;
  await loadClasses();
}

let adapters = [];

// The adapters of the chosen model ("none": the base model).
function loadAdapters() {
  const picker = $("adapter");
  const current = picker.value;
  picker.replaceChildren(new Option("none (the base model)", ""));
  for (const adapter of adapters.filter((a) => a.parent === $("model").value)) {
    picker.append(new Option(adapter.id, adapter.id));
  }
  picker.value = [...picker.options].some((o) => o.value === current) ? current : "";
  $("adapter-field").hidden = picker.options.length < 2;
}

// What requests name as `model`: the adapter when one is picked, else the model.
function requestModel() {
  return $("adapter").value || $("model").value || undefined;
}

function setGrid() {
  const option = $("model").selectedOptions[0];
  edit.grid = option ? Number(option.dataset.grid) : 16;
  $("edit-row").max = edit.grid - 1;
  if (Number($("edit-row").value) > edit.grid - 1) $("edit-row").value = edit.grid - 1;
  showCut();
}

function isTextModel() {
  const option = $("model").selectedOptions[0];
  return option !== undefined && option.dataset.task === "t2i";
}

async function loadClasses() {
  const model = $("model").value;
  if (!model) return;
  setGrid();
  loadAdapters();
  // A text-conditional model takes a caption: no class list to complete from.
  $("prompt-label").textContent = isTextModel() ? "Prompt" : "Class";
  $("prompt").placeholder = isTextModel() ? "a caption" : "a class name or id";
  $("negative-label").textContent = isTextModel() ? "Negative prompt" : "Negative class";
  // The original samplers' defaults: sample_t2i.py guides harder and keeps fewer tokens.
  $("cfg").value = isTextModel() ? 7.5 : 4;
  $("topk").value = isTextModel() ? 1000 : 2000;
  const response = await fetch(`/v1/classes?model=${encodeURIComponent(model)}`,
    { headers: headers() });
  if (!response.ok) return;
  const list = $("classes");
  list.replaceChildren(...(await response.json()).classes.map((name) => new Option(name)));
}

function makeTile(index, total) {
  const figure = document.createElement("figure");
  figure.className = "tile";
  figure.dataset.index = index;
  const img = document.createElement("img");
  img.alt = `Image ${index + 1} of ${total}, waiting`;
  const caption = document.createElement("figcaption");
  const progress = document.createElement("span");
  progress.className = "progress";
  progress.textContent = "queued…";
  caption.append(progress);
  figure.append(img, caption);
  return figure;
}

// A finished image: {b64, subject, seed, seconds (optional), prompt (to regenerate it)}.
function finishTile(tile, image) {
  const img = tile.querySelector("img");
  img.src = `data:image/png;base64,${image.b64}`;
  img.alt = `${image.subject}, seed ${image.seed ?? "greedy"}`;
  tile.classList.remove("preview");
  tile.classList.add("done");
  const caption = tile.querySelector("figcaption");
  const info = document.createElement("span");
  const time = image.seconds === undefined ? "" : ` · ${image.seconds.toFixed(2)} s`;
  info.textContent = `${image.subject} · seed ${image.seed ?? "–"}${time}`;
  const download = document.createElement("a");
  download.href = img.src;  // the PNG bytes as served: provenance metadata intact
  download.download = `llamagen_${image.seed ?? "greedy"}.png`;
  download.textContent = "Download";
  const again = document.createElement("button");
  again.type = "button";
  again.textContent = "Regenerate";
  again.setAttribute("aria-label", `Regenerate image with seed ${image.seed}`);
  again.addEventListener("click", () => {
    $("seed").value = image.seed ?? 0;
    $("n").value = 1;
    $("prompt").value = image.prompt;
    $("negative").value = image.negative ?? "";
    $("controls").requestSubmit();
  });
  const toEdit = document.createElement("button");
  toEdit.type = "button";
  toEdit.textContent = "Edit";
  toEdit.setAttribute("aria-label", `Edit the image with seed ${image.seed}`);
  toEdit.addEventListener("click", async () => {
    const blob = await (await fetch(img.src)).blob();
    setEditSource(blob, `${image.subject}, seed ${image.seed ?? "greedy"}`);
    $("edit").scrollIntoView({ behavior: "smooth" });
  });
  caption.replaceChildren(info, download, again, toEdit);
}

// Server-sent events over fetch (EventSource cannot POST): yields {event, data} records.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replaceAll("\r\n", "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trim());
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

const PREVIEWS = 3;  // partial images asked for per image

// One streamed request that fills `n` tiles: each preview redraws its tile, each finished
// image completes it. `api`: the endpoint's event types (`preview`, `image`), the tile's
// `name` in alt texts, the progress word (`drawing`), and `finished(data)`: a finished
// image's {index, b64, subject, seed, seconds, prompt}. Resolves to how many finished.
async function streamTiles(n, status, url, init, api) {
  // One at a time: the tiles belong to the request in flight (a finished tile's Regenerate
  // clicked mid-run is ignored rather than draw over them).
  if (running > 0) return 0;
  const tiles = $("tiles");
  tiles.replaceChildren(...Array.from({ length: n }, (_, i) => makeTile(i, n)));
  const buttons = [$("generate"), $("edit-go")];
  const enabled = buttons.map((button) => !button.disabled);
  for (const button of buttons) button.disabled = true;
  $("status").textContent = status;
  running += 1;
  pollMetrics();  // the panel shows the load at once, then at the faster rate
  let finished = 0;
  try {
    const response = await fetch(url, init);
    if (!response.ok) {
      tiles.replaceChildren();
      showError(await apiError(response));
      $("status").textContent = "";
      return 0;
    }
    for await (const { event: kind, data } of sseEvents(response)) {
      if (kind === "error") {
        showError(data.error.message);
        break;
      }
      if (data.type === api.preview) {
        const tile = tiles.children[data.image_index];
        const k = data.partial_image_index + 1;
        tile.querySelector("img").src = `data:image/png;base64,${data.b64_json}`;
        tile.querySelector("img").alt = `${api.name} ${data.image_index + 1}, preview ${k} of ${PREVIEWS}`;
        tile.querySelector(".progress").textContent = `${api.drawing}… ${k}/${PREVIEWS}`;
        tile.classList.add("preview");
      } else if (data.type === api.image) {
        const image = api.finished(data);
        finishTile(tiles.children[image.index], image);
        finished += 1;
      }
    }
  } catch (err) {
    showError(`Request failed: ${err.message}`);
  } finally {
    running -= 1;
    buttons.forEach((button, i) => { button.disabled = !enabled[i]; });
  }
  return finished;
}

async function generate(event) {
  event.preventDefault();
  showError("");
  const n = Number($("n").value);
  const prompt = $("prompt").value.trim();
  const request = {
    model: requestModel(),
    [isTextModel() ? "prompts" : "labels"]: Array(n).fill(prompt),
    cfg_scale: Number($("cfg").value),
    top_k: Number($("topk").value),
    temperature: Number($("temperature").value),
    seed: Number($("seed").value),
    stream: true,
    partial_images: PREVIEWS,
  };
  const negative = $("negative").value.trim();
  if (negative) request.negative_prompt = negative;
  const adapter = $("adapter").value;
  const started = performance.now();
  const finished = await streamTiles(
    n, `Generating ${n} image${n > 1 ? "s" : ""} of “${prompt}”…`, "/v1/generate",
    { method: "POST", headers: headers(), body: JSON.stringify(request) },
    {
      preview: "partial_image", image: "image", name: "Image", drawing: "drawing",
      finished: (data) => ({
        index: data.index, b64: data.b64_json,
        subject: (data.class_name ?? data.prompt) +
          (data.negative_prompt ? `, not ${data.negative_prompt}` : "") +
          (adapter ? ` (${adapter})` : ""),
        seed: data.seed, seconds: data.seconds, prompt, negative,
      }),
    });
  if (finished === n) {
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    $("status").textContent = `Done: ${n} image${n > 1 ? "s" : ""} in ${seconds} s.`;
  }
}

// ---- edits: keep the input's top token rows, redraw the rest ----

function showCut() {
  const row = Number($("edit-row").value);
  $("edit-row-value").textContent = String(row);
  const cut = $("edit-cut");
  const top = (row / edit.grid) * 256;
  cut.style.top = `${top}px`;
  cut.style.height = `${256 - top}px`;
}

function setEditSource(blob, description) {
  edit.blob = blob;
  const img = $("edit-img");
  if (img.src.startsWith("blob:")) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(blob);
  $("edit-source").hidden = false;
  $("edit-caption").textContent = `Editing ${description}`;
  $("edit-go").disabled = false;
  showCut();
}

function pickRow(event) {
  const img = $("edit-img");
  const row = Math.floor((event.offsetY / img.clientHeight) * edit.grid);
  $("edit-row").value = Math.min(edit.grid - 1, Math.max(1, row));
  showCut();
}

async function redraw() {
  showError("");
  const prompt = $("prompt").value.trim();
  if (!edit.blob || !prompt) {
    showError(prompt ? "Choose an image to edit first." : "Give a class or prompt first.");
    return;
  }
  const n = Number($("n").value);
  const row = Number($("edit-row").value);
  const form = new FormData();
  form.append("image", edit.blob, "input.png");
  const fields = {
    prompt, n, keep_rows: row, stream: true, partial_images: PREVIEWS,
    cfg_scale: $("cfg").value, top_k: $("topk").value, temperature: $("temperature").value,
    seed: $("seed").value,
  };
  const negative = $("negative").value.trim();
  if (negative) fields.negative_prompt = negative;
  if (requestModel()) fields.model = requestModel();
  for (const [name, value] of Object.entries(fields)) form.append(name, String(value));
  const started = performance.now();
  const finished = await streamTiles(
    n, `Redrawing rows ${row}–${edit.grid - 1} as “${prompt}”…`, "/v1/images/edits",
    { method: "POST", headers: authHeaders(), body: form },
    {
      preview: "image_edit.partial_image", image: "image_edit.completed", name: "Edit",
      drawing: "redrawing",
      finished: (data) => ({
        index: data.image_index, b64: data.b64_json,
        subject: `${data.revised_prompt ?? prompt} (kept ${data.kept_rows} rows)`,
        seed: data.seed, prompt, negative,
      }),
    });
  if (finished === n) {
    const seconds = ((performance.now() - started) / 1000).toFixed(2);
    $("status").textContent = `Done: ${n} edit${n > 1 ? "s" : ""} in ${seconds} s.`;
  }
}

// ---- the live panel: the server's rate and queue, from /metrics ----

let running = 0;  // requests of this page in flight: poll faster meanwhile
const samples = [];  // [time in ms, images generated so far]

function parseMetrics(text) {
  const sum = (name) => text.split("\n")
    .filter((line) => line.startsWith(name) && !line.startsWith("#"))
    .reduce((total, line) => total + Number(line.split(" ").pop()), 0);
  return { done: sum("llamagen_images_generated_total"), queue: sum("llamagen_queue_depth") };
}

let pollTimer = 0;
let polling = false;

async function pollMetrics() {
  clearTimeout(pollTimer);
  if (polling) return;  // the poll in flight schedules the next one
  polling = true;
  try {
    const response = await fetch("/metrics");
    if (response.ok) {
      const { done, queue } = parseMetrics(await response.text());
      const now = performance.now();
      samples.push([now, done]);
      // Images/s over the last 5 s, from the server's own counter (every client counts).
      while (samples.length > 2 && now - samples[1][0] >= 5000) samples.shift();
      const [then, before] = samples[0];
      const rate = now > then ? ((done - before) * 1000) / (now - then) : 0;
      $("ips").textContent = rate.toFixed(2);
      $("queue").textContent = String(queue);
    }
  } catch {
    // the panel is best-effort; the next poll retries
  } finally {
    polling = false;
  }
  pollTimer = setTimeout(pollMetrics, running > 0 ? 500 : 2000);
}

window.addEventListener("DOMContentLoaded", () => {
  $("apikey").value = localStorage.getItem(KEY_STORE) || "";
  $("apikey").addEventListener("change", () => {
    localStorage.setItem(KEY_STORE, $("apikey").value.trim());
    loadModels();
  });
  $("model").addEventListener("change", loadClasses);
  $("dice").addEventListener("click", () => {
    $("seed").value = Math.floor(Math.random() * 2 ** 31);
  });
  $("controls").addEventListener("submit", generate);
  $("edit-file").addEventListener("change", () => {
    const file = $("edit-file").files[0];
    if (file) setEditSource(file, file.name);
  });
  $("edit-row").addEventListener("input", showCut);
  $("edit-img").addEventListener("click", pickRow);
  $("edit-go").addEventListener("click", redraw);
  loadModels();
  pollMetrics();
});
