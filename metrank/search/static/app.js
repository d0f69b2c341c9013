// metrank search page: runs ?q=... (and &k=, &modality=) on load, renders hits with their images and scores.
"use strict";
const $ = (id) => document.getElementById(id);
const keyInput = $("api-key");
keyInput.value = localStorage.getItem("metrank-api-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("metrank-api-key", keyInput.value));

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (keyInput.value) h["X-API-Key"] = keyInput.value;
  return h;
}

function caption(hit) {
  const m = hit.metadata || {};
  return m.name || m.caption || m.title || hit.text || ("#" + hit.id);
}

async function imageSrc(url) {
  if (!keyInput.value) return url;  // no key: the browser fetches it directly
  const response = await fetch(url, { headers: headers() });
  return response.ok ? URL.createObjectURL(await response.blob()) : "";
}

async function render(hits, elapsedMs) {
  const results = $("results");
  results.replaceChildren();
  for (const [rank, hit] of hits.entries()) {
    const card = document.createElement("figure");
    card.className = "hit";
    card.dataset.id = hit.id;
    card.dataset.score = hit.score.toFixed(6);
    const rankEl = document.createElement("span");
    rankEl.className = "rank";
    rankEl.textContent = rank + 1;
    card.append(rankEl);
    if (hit.image_url) {
      const img = document.createElement("img");
      img.alt = caption(hit);
      img.src = await imageSrc(hit.image_url);
      card.append(img);
    } else {
      const text = document.createElement("div");
      text.className = "text-item";
      text.textContent = hit.text || "(vector)";
      card.append(text);
    }
    const cap = document.createElement("figcaption");
    const name = document.createElement("span");
    name.className = "caption";
    name.textContent = caption(hit);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = "score " + hit.score.toFixed(3);
    cap.append(name, score);
    card.append(cap);
    results.append(card);
  }
  setStatus(`${hits.length} results in ${elapsedMs.toFixed(0)} ms`);
  document.body.dataset.state = "done";
}

function setStatus(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

async function run(request) {
  document.body.dataset.state = "loading";
  setStatus("searching…");
  const started = performance.now();
  try {
    const response = await fetch(request.url, request.init);
    const payload = await response.json();
    if (!response.ok) throw new Error(payload.detail || response.statusText);
    await render(payload.hits, performance.now() - started);
  } catch (err) {
    $("results").replaceChildren();
    setStatus("error: " + err.message, true);
    document.body.dataset.state = "error";
  }
}

function searchText() {
  const q = $("query").value.trim();
  if (!q) return;
  const body = { text: q, k: parseInt($("k").value, 10) || 12 };
  if ($("modality").value) body.modality = $("modality").value;
  const params = new URLSearchParams({ q: q, k: body.k, modality: $("modality").value });
  history.replaceState(null, "", "?" + params.toString());
  run({ url: "/search", init: { method: "POST", headers: headers({ "Content-Type": "application/json" }),
                                 body: JSON.stringify(body) } });
}

function searchImage(file) {
  const form = new FormData();
  form.append("file", file);
  form.append("k", parseInt($("k").value, 10) || 12);
  if ($("modality").value) form.append("modality", $("modality").value);
  run({ url: "/search/image", init: { method: "POST", headers: headers(), body: form } });
}

$("search-form").addEventListener("submit", (event) => { event.preventDefault(); searchText(); });
$("image-query").addEventListener("change", (event) => {
  if (event.target.files.length) searchImage(event.target.files[0]);
});

const params = new URLSearchParams(location.search);
if (params.get("k")) $("k").value = params.get("k");
if (params.get("modality")) $("modality").value = params.get("modality");
if (params.get("q")) {
  $("query").value = params.get("q");
  searchText();
}
