"""The page at ``/``: pick a model, make samples, rate them (thumbs up or down, a
corrected text), all through the JSON API the page is served with (no build step, no
outside scripts). Element ids are stable: the browser test drives them."""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>genframe</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 60rem; padding: 0 1rem; }
  fieldset { border: 1px solid #ccc; border-radius: 6px; margin-bottom: 1rem; }
  label { display: inline-block; margin: .25rem 1rem .25rem 0; }
  input[type=number] { width: 6rem; }
  #prompt { width: 100%; }
  #samples { display: flex; flex-wrap: wrap; gap: 1rem; }
  .sample { border: 1px solid #ddd; border-radius: 6px; padding: .5rem; width: 14rem; }
  .sample img { width: 100%; image-rendering: pixelated; background: #000; }
  .sample pre { white-space: pre-wrap; font-size: .85rem; max-height: 12rem; overflow: auto; }
  .sample textarea { width: 100%; box-sizing: border-box; }
  .rated { outline: 3px solid #6a6; }
  #status { color: #555; min-height: 1.2rem; }
  #status.error { color: #b00; }
</style>
</head>
<body>
<h1>genframe</h1>
<fieldset>
  <legend>Model</legend>
  <label>model <select id="model"></select></label>
  <label>bearer token <input id="token" type="password" autocomplete="off" placeholder="(if the server needs one)"></label>
  <div id="model-info"></div>
</fieldset>
<fieldset>
  <legend>Request</legend>
  <div id="prompt-row"><label for="prompt">prompt</label><br><textarea id="prompt" rows="3"></textarea></div>
  <label id="label-row">class label <input id="label" type="number" min="0" step="1"></label>
  <label>samples <input id="num" type="number" min="1" value="4" step="1"></label>
  <label>seed <input id="seed" type="number" min="0" step="1" placeholder="random"></label>
  <label id="temperature-row">temperature <input id="temperature" type="number" min="0" step="0.1" value="0.8"></label>
  <label id="tokens-row">max new tokens <input id="max-tokens" type="number" min="1" value="64"></label>
  <label id="steps-row">steps <input id="steps" type="number" min="1" value="20"></label>
  <button id="generate">Generate</button>
</fieldset>
<div id="status" role="status"></div>
<div id="samples"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
let models = {};
const token = $("token");
token.value = localStorage.getItem("genframe-token") || "";
token.addEventListener("change", () => localStorage.setItem("genframe-token", token.value));

function headers() {
  const h = {"Content-Type": "application/json"};
  if (token.value) h["Authorization"] = "Bearer " + token.value;
  return h;
}
function status(text, error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}
async function call(path, body) {
  const r = await fetch(path, {method: "POST", headers: headers(), body: JSON.stringify(body)});
  const data = await r.json().catch(() => ({detail: r.statusText}));
  if (!r.ok) throw new Error(r.status + ": " + (data.detail || r.statusText));
  return data;
}
function showModel() {
  const m = models[$("model").value];
  if (!m) return;
  const text = m.kind === "text";
  $("prompt-row").hidden = !(m.conditions.includes("prompt"));
  $("label-row").hidden = !(m.conditions.includes("label"));
  $("temperature-row").hidden = !m.sampling_options.includes("temperature");
  $("tokens-row").hidden = !text;
  $("steps-row").hidden = !m.sampling_options.includes("sampler");
  $("model-info").textContent = m.model + " (" + m.kind + "), " + m.version;
}
async function loadModels() {
  const r = await fetch("/health");
  const data = await r.json();
  for (const m of data.models) {
    models[m.name] = m;
    const o = document.createElement("option");
    o.value = o.textContent = m.name;
    $("model").appendChild(o);
  }
  showModel();
}
$("model").addEventListener("change", showModel);

function rateButtons(card, id, text) {
  const row = document.createElement("div");
  const send = async (rating) => {
    const body = {sample_id: id, rating: rating};
    const fix = card.querySelector("textarea");
    if (fix && fix.value.trim() && fix.value !== text) body.corrected_text = fix.value;
    try {
      await call("/feedback", body);
      card.classList.add("rated");
      card.dataset.rating = String(rating);
      status("thanks: feedback stored for " + id);
    } catch (e) { status(e.message, true); }
  };
  for (const [label, rating, cls] of [["\\u{1F44D}", 1, "up"], ["\\u{1F44E}", -1, "down"]]) {
    const b = document.createElement("button");
    b.textContent = label;
    b.className = "rate-" + cls;
    b.title = rating > 0 ? "good" : "bad";
    b.addEventListener("click", () => send(rating));
    row.appendChild(b);
  }
  card.appendChild(row);
}
$("generate").addEventListener("click", async () => {
  const m = models[$("model").value];
  const body = {model: m.name, num_samples: parseInt($("num").value || "1", 10), sampling: {}};
  if (!$("prompt-row").hidden && $("prompt").value) body.prompt = $("prompt").value;
  if (!$("label-row").hidden && $("label").value !== "") body.label = parseInt($("label").value, 10);
  if ($("seed").value !== "") body.seed = parseInt($("seed").value, 10);
  if (!$("temperature-row").hidden) body.sampling.temperature = parseFloat($("temperature").value);
  if (!$("tokens-row").hidden) body.sampling.max_new_tokens = parseInt($("max-tokens").value, 10);
  if (!$("steps-row").hidden) body.steps = parseInt($("steps").value, 10);
  status("generating ...");
  $("generate").disabled = true;
  try {
    const data = await call("/generate", body);
    const box = $("samples");
    box.innerHTML = "";
    for (const s of data.samples) {
      const card = document.createElement("div");
      card.className = "sample";
      card.dataset.id = s.id;
      if (s.image) {
        const img = document.createElement("img");
        img.src = "data:image/png;base64," + s.image;
        img.alt = "sample " + s.id;
        card.appendChild(img);
      } else {
        const pre = document.createElement("pre");
        pre.textContent = (body.prompt || "") + s.text;
        card.appendChild(pre);
        const fix = document.createElement("textarea");
        fix.rows = 3;
        fix.value = s.text;
        fix.title = "a corrected text (sent with your rating)";
        card.appendChild(fix);
      }
      rateButtons(card, s.id, s.text);
      box.appendChild(card);
    }
    status(data.samples.length + " samples from " + data.model + " (seed " + data.seed + ")");
  } catch (e) {
    status(e.message, true);
  } finally {
    $("generate").disabled = false;
  }
});
loadModels().catch((e) => status("cannot reach the server: " + e.message, true));
</script>
</body>
</html>
"""
