// The playground: plain JavaScript, no build step. It talks to the native API (/v1/generate)
// with streaming, so every tile fills in from the server's previews as the grid is generated.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "llamagen.apiKey";

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
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
  for (const model of (await response.json()).data) {
    const option = new Option(`${model.id} (${model.image_size}px)`, model.id);
    option.dataset.task = model.task;
    select.append(option);
  }
  if (current) select.value = current;
  await loadClasses();
}

function isTextModel() {
  const option = $("model").selectedOptions[0];
  return option !== undefined && option.dataset.task === "t2i";
}

async function loadClasses() {
  const model = $("model").value;
  if (!model) return;
  // A text-conditional model takes a caption: no class list to complete from.
  $("prompt-label").textContent = isTextModel() ? "Prompt" : "Class";
  $("prompt").placeholder = isTextModel() ? "a caption" : "a class name or id";
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

function finishTile(tile, image, request) {
  const img = tile.querySelector("img");
  img.src = `data:image/png;base64,${image.b64_json}`;
  const subject = image.class_name ?? image.prompt;  // c2i: the class; t2i: the caption
  img.alt = `${subject}, seed ${image.seed ?? "greedy"}`;
  tile.classList.add("done");
  const caption = tile.querySelector("figcaption");
  const info = document.createElement("span");
  info.textContent = `${subject} · seed ${image.seed ?? "–"} · ${image.seconds.toFixed(2)} s`;
  const download = document.createElement("a");
  download.href = img.src;  // the PNG bytes as served: provenance metadata intact
  const stem = image.class_label ?? "t2i";
  download.download = `llamagen_${stem}_${image.seed ?? "greedy"}.png`;
  download.textContent = "Download";
  const again = document.createElement("button");
  again.type = "button";
  again.textContent = "Regenerate";
  again.setAttribute("aria-label", `Regenerate image with seed ${image.seed}`);
  again.addEventListener("click", () => {
    $("seed").value = image.seed ?? 0;
    $("n").value = 1;
    $("prompt").value = request.prompt;
    $("controls").requestSubmit();
  });
  caption.replaceChildren(info, download, again);
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

async function generate(event) {
  event.preventDefault();
  showError("");
  const n = Number($("n").value);
  const prompt = $("prompt").value.trim();
  const request = {
    model: $("model").value || undefined,
    [isTextModel() ? "prompts" : "labels"]: Array(n).fill(prompt),
    cfg_scale: Number($("cfg").value),
    top_k: Number($("topk").value),
    temperature: Number($("temperature").value),
    seed: Number($("seed").value),
    stream: true,
    partial_images: 3,
  };
  const tiles = $("tiles");
  tiles.replaceChildren(...Array.from({ length: n }, (_, i) => makeTile(i, n)));
  $("generate").disabled = true;
  $("status").textContent = `Generating ${n} image${n > 1 ? "s" : ""} of “${prompt}”…`;
  const started = performance.now();
  try {
    const response = await fetch("/v1/generate", {
      method: "POST", headers: headers(), body: JSON.stringify(request),
    });
    if (!response.ok) {
      tiles.replaceChildren();
      showError(await apiError(response));
      $("status").textContent = "";
      return;
    }
    for await (const { event: kind, data } of sseEvents(response)) {
      if (kind === "error") {
        showError(data.error.message);
        break;
      }
      if (data.type === "partial_image") {
        const tile = tiles.children[data.image_index];
        tile.querySelector("img").src = `data:image/png;base64,${data.b64_json}`;
        tile.querySelector("img").alt = `Image ${data.image_index + 1}, preview ${data.partial_image_index + 1} of 3`;
        tile.querySelector(".progress").textContent = `drawing… ${data.partial_image_index + 1}/3`;
        tile.classList.add("preview");
      } else if (data.type === "image") {
        finishTile(tiles.children[data.index], data, { prompt });
      } else if (data.type === "done") {
        const seconds = ((performance.now() - started) / 1000).toFixed(2);
        $("status").textContent = `Done: ${n} image${n > 1 ? "s" : ""} in ${seconds} s.`;
      }
    }
  } catch (err) {
    showError(`Request failed: ${err.message}`);
  } finally {
    $("generate").disabled = false;
  }
}

function parseMetrics(text) {
  const sum = (name) => text.split("\n")
    .filter((line) => line.startsWith(name) && !line.startsWith("#"))
    .reduce((total, line) => total + Number(line.split(" ").pop()), 0);
  return { ips: sum("llamagen_images_per_second"), queue: sum("llamagen_queue_depth") };
}

async function pollMetrics() {
  try {
    const response = await fetch("/metrics");
    if (response.ok) {
      const { ips, queue } = parseMetrics(await response.text());
      $("ips").textContent = ips.toFixed(2);
      $("queue").textContent = String(queue);
    }
  } catch {
    // the panel is best-effort; the next poll retries
  }
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
  loadModels();
  pollMetrics();
  setInterval(pollMetrics, 2000);
});
