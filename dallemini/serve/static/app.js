// The dallemini web page: reads the server's limits and what the model draws from /health, streams
// a generation from POST /v1/generate/stream (server-sent events read with fetch, so an API key
// header and an init image can be sent), fills the image grid as partial frames arrive and says which words of the prompt
// the model does not know.
"use strict";

const $ = (id) => document.getElementById(id);
let controller = null;
let modelName = "This model";  // "The built-in model" for the package's own

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function showUnknown(words, readAs) {
  const note = $("unknown");
  const read = Object.entries(readAs || {}).map(([a, b]) => `"${a}" as "${b}"`);
  const parts = [];
  if (read.length > 0) {
    parts.push(`${modelName} reads ${read.join(", ")}.`);
  }
  if (words && words.length > 0) {
    parts.push(
      `${modelName} does not know: ${words.join(", ")}. It reads the prompt without them and ` +
        "can only draw what its training captions describe, so expect something else.",
    );
  }
  note.hidden = parts.length === 0;
  note.textContent = parts.join(" ");
}

function showExamples(model) {
  const examples = model.examples || [];
  $("about").hidden = !model.description && examples.length === 0;
  $("about-text").textContent = model.description ? `What it draws: ${model.description}` : "";
  $("about-text").hidden = !model.description;
  $("examples").hidden = examples.length === 0;
  for (const text of examples) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "example";
    button.textContent = text;
    button.addEventListener("click", () => {
      $("prompt").value = text;
      $("prompt").focus();
    });
    $("examples").append(button);
  }
  if (examples.length) $("prompt").placeholder = examples[0];
}

function setStatus(text) {
  $("status").textContent = text;
}

function setProgress(fraction) {
  $("progress").hidden = fraction === null;
  $("bar").style.width = `${Math.round((fraction || 0) * 100)}%`;
}

function setBusy(busy) {
  $("run").disabled = busy;
  $("run").textContent = busy ? "Generating…" : "Generate";
  $("stop").hidden = !busy;
}

function slug(text) {
  return text.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 40) || "image";
}

async function loadInfo() {
  try {
    const health = await (await fetch("/health")).json();
    const n = $("num_images");
    n.max = health.limits.max_images;
    n.value = Math.min(health.defaults.num_images, health.limits.max_images);
    $("temperature").value = health.defaults.temperature;
    $("top_k").value = health.defaults.top_k;
    $("top_p").placeholder = `default (${health.defaults.top_p})`;
    $("condition_scale").value = health.defaults.condition_scale;
    $("prompt").maxLength = health.limits.max_prompt_chars;
    $("key-field").hidden = !health.auth;
    if (health.model.builtin) modelName = "The built-in model";
    showExamples(health.model);
    if (!health.model.reranker) {
      $("rerank").checked = false;
      $("rerank").disabled = true;
      $("rerank").parentElement.title = "this server has no CLIP model to rerank with";
    }
    $("footer").textContent =
      `${health.version} · ${health.model.image_size}×${health.model.image_size} px · ${health.model.device}`;
  } catch (e) {
    showError(`Cannot reach the server: ${e.message}`);
  }
  $("api_key").value = localStorage.getItem("dallemini-api-key") || "";
}

function makeCards(count) {
  const grid = $("grid");
  grid.replaceChildren();
  const cards = [];
  for (let i = 0; i < count; i++) {
    const card = document.createElement("figure");
    card.className = "card";
    const img = document.createElement("img");
    img.alt = "";  // set once the image is there
    const meta = document.createElement("figcaption");
    meta.className = "meta";
    const label = document.createElement("span");
    label.textContent = `image ${i + 1}`;
    const link = document.createElement("a");
    link.className = "download";
    link.textContent = "Download";
    link.setAttribute("aria-disabled", "true");
    meta.append(label, link);
    card.append(img, meta);
    grid.append(card);
    cards.push({ card, img, label, link });
  }
  return cards;
}

async function errorText(res) {
  let detail = res.statusText;
  try {
    const body = await res.json();
    if (body && body.detail) detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
  } catch (e) {
    /* not JSON */
  }
  let text = `Error ${res.status}: ${detail}`;
  const retry = res.headers.get("Retry-After");
  if (retry) text += ` (try again in ${retry} s)`;
  return text;
}

async function readEvents(res, onEvent) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) onEvent(event, JSON.parse(data.join("\n")));
    }
  }
}

const MAX_INIT_BYTES = 1_500_000;  // the server takes init images of up to ~1.5 MB

function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(new Error(`Cannot read ${file.name}.`));
    reader.readAsDataURL(file);
  });
}

// The request body: what the form says, the model's defaults for fields left empty, and the init
// image (base64) when one is chosen: its top rows of image tokens are kept.
async function requestBody(prompt) {
  const body = { prompt, num_images: Number($("num_images").value), rerank: $("rerank").checked };
  for (const name of ["seed", "temperature", "top_k", "top_p", "condition_scale"]) {
    const v = $(name).value.trim();
    if (v !== "") body[name] = Number(v);
  }
  const file = $("init_image").files[0];
  if (file) {
    if (file.size > MAX_INIT_BYTES) throw new Error("The image is too large (at most 1.5 MB).");
    body.init_image = await readBase64(file);
    body.keep_rows = Number($("keep_rows").value || 0);
  }
  return body;
}

async function generate(event) {
  event.preventDefault();
  hideError();
  showUnknown([]);
  const prompt = $("prompt").value.trim();
  if (!prompt) {
    showError("Type a prompt first.");
    return;
  }
  const count = Number($("num_images").value);
  const max = Number($("num_images").max);
  if (!Number.isInteger(count) || count < 1 || count > max) {
    showError(`Number of images must be between 1 and ${max}.`);
    return;
  }
  const headers = {};
  const key = $("api_key").value.trim();
  if (key) {
    headers["X-API-Key"] = key;
    localStorage.setItem("dallemini-api-key", key);
  }
  let cards = [];
  controller = new AbortController();
  setBusy(true);
  setStatus("Sending…");
  setProgress(0);
  const started = performance.now();
  let finished = false;
  let frames = 0;
  try {
    const body = JSON.stringify(await requestBody(prompt));
    headers["Content-Type"] = "application/json";
    const res = await fetch("/v1/generate/stream", { method: "POST", headers, body, signal: controller.signal });
    if (!res.ok) throw new Error(await errorText(res));
    cards = makeCards(count);  // only now: a refused request leaves the last results in place
    await readEvents(res, (name, data) => {
      if (name === "accepted") {
        showUnknown(data.unknown_words, data.read_as);
        setStatus(`Waiting for the model… (seed ${data.seed})`);
      } else if (name === "progress") {
        frames += 1;
        $("grid").dataset.frames = String(frames);
        setProgress(data.done / data.total);
        setStatus(`Drawing… ${data.done} of ${data.total} tokens`);
        data.images.forEach((b64, i) => {
          if (cards[i]) {
            cards[i].img.src = `data:image/png;base64,${b64}`;
            cards[i].img.alt = `partial image ${i + 1}`;
          }
        });
      } else if (name === "result") {
        finished = true;
        showUnknown(data.unknown_words, data.read_as);
        data.images.forEach((im, i) => {
          const c = cards[i];
          if (!c) return;
          const src = im.base64 ? `data:image/png;base64,${im.base64}` : im.url;
          c.img.src = src;
          c.img.alt = `${data.prompt} (seed ${im.seed})`;
          c.label.textContent = im.score === null ? `seed ${im.seed}` : `seed ${im.seed} · score ${im.score.toFixed(3)}`;
          c.link.href = src;
          c.link.download = `dallemini-${slug(data.prompt)}-${im.seed}.png`;
          c.link.removeAttribute("aria-disabled");
          c.card.classList.add("done");
        });
        setProgress(1);
        setStatus(`Done in ${((performance.now() - started) / 1000).toFixed(1)} s`);
      } else if (name === "error") {
        finished = true;
        throw new Error(`Error ${data.status}: ${data.detail}`);
      }
    });
    if (!finished) throw new Error("The connection closed before the images were finished.");
  } catch (e) {
    if (e.name === "AbortError") {
      setStatus("Stopped.");
    } else {
      showError(e.message);
      setStatus("");
    }
    cards.forEach((c) => c.card.classList.contains("done") || c.card.remove());
    setProgress(null);
  } finally {
    controller = null;
    setBusy(false);
  }
}

$("form").addEventListener("submit", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
loadInfo();
