// The page at /: pick a model, drop an image, see its top classes.  Plain JavaScript, no build step;
// it calls the same HTTP API as any client (POST /v2/repository/index, GET /v2/models/{name},
// POST /v2/models/{name}/classify).
"use strict";

const $ = (id) => document.getElementById(id);
const TOP_K = 5;

function headers() {
  const token = $("token").value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

function showMessage(text) {
  $("message").textContent = text;
  $("message").hidden = false;
}

function clearMessage() {
  $("message").hidden = true;
  $("message").textContent = "";
}

async function callApi(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) {
    $("token-field").hidden = false;
    throw new Error("This server needs a token: enter it above, then try again.");
  }
  if (!response.ok) {
    throw new Error(body.error || `${response.status} ${response.statusText}`);
  }
  return body;
}

async function loadModels() {
  try {
    const models = await callApi("/v2/repository/index", { method: "POST", body: '{"ready": true}',
                                                           headers: { "Content-Type": "application/json" } });
    const names = [...new Set(models.map((model) => model.name))];
    $("model").replaceChildren(...names.map((name) => new Option(name, name)));
    if (!names.length) showMessage("No model is ready yet; reload the page in a moment.");
    else { clearMessage(); await describeModel(); }
  } catch (error) {
    showMessage(error.message);
  }
}

async function describeModel() {
  const name = $("model").value;
  if (!name) return;
  try {
    const metadata = await callApi("/v2/models/" + encodeURIComponent(name));
    const p = metadata.parameters || {};
    const [, height, width, channels] = metadata.inputs[0].shape;
    $("model-info").textContent = `version ${p.version} · ${p.execution_provider} · ` +
      `${p.verified ? "verified" : "unverified"} · input ${height}×${width}×${channels}`;
  } catch (error) {
    showMessage(error.message);
  }
}

function isImage(file) {
  return file.type.startsWith("image/");
}

async function classify(file) {
  $("result").hidden = true;
  clearMessage();
  if (!isImage(file)) {
    showMessage(`“${file.name}” is not an image (${file.type || "unknown type"}): choose a PNG, JPEG, GIF, ` +
                "BMP or WebP file.");
    return;
  }
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  const form = new FormData();
  form.append("image", file, file.name);
  const name = $("model").value;
  try {
    const answer = await callApi(`/v2/models/${encodeURIComponent(name)}/classify?top_k=${TOP_K}`,
                                 { method: "POST", body: form });
    render(answer);
  } catch (error) {
    showMessage(`The server could not classify “${file.name}”: ${error.message}`);
  }
}

function render(answer) {
  const result = answer.results[0];
  $("label").textContent = result.label;
  $("score").textContent = `${(result.score * 100).toFixed(1)}%`;
  $("answered-by").textContent = `model ${answer.model_name}, version ${answer.model_version} · ` +
    `${answer.execution_provider} · ${answer.verified ? "verified" : "unverified"}`;
  $("bars").replaceChildren(...result.top_k.map((entry) => {
    const item = document.createElement("li");
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = entry.label;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(entry.score * 100, 0.5)}%`;
    bar.append(fill);
    const value = document.createElement("span");
    value.className = "value";
    value.textContent = `${(entry.score * 100).toFixed(1)}%`;
    item.append(label, bar, value);
    return item;
  }));
  $("result").hidden = false;
}

function setUp() {
  $("model").addEventListener("change", describeModel);
  $("token").addEventListener("change", loadModels);
  $("file").addEventListener("change", () => { if ($("file").files[0]) classify($("file").files[0]); });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files[0]) classify(event.dataTransfer.files[0]);
  });
  loadModels();
}

setUp();
