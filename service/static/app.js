// The lookalike page: upload or pick an image, show its matches with cosine scores.
// Plain DOM code talking to the same JSON API as every other client.
"use strict";

const PAGE_SIZE = 60;
const $ = (id) => document.getElementById(id);
let galleryOffset = 0;
let lastQuery = null; // re-runs the last search, e.g. when k changes
let currentQuery = null; // {file, src} or {key, src}: what a clicked match is explained against

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    return body.detail.map((d) => `${d.loc.join(".")}: ${d.msg}`).join("; ");
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// A collection image as a grid tile: its thumbnail (the duplicates view adds its own caption).
function thumbnailTile(item) {
  const li = document.createElement("li");
  li.className = "tile";
  li.dataset.key = item.key;
  const img = document.createElement("img");
  img.loading = "lazy";
  img.alt = item.key;
  if (item.thumbnail_url) img.src = item.thumbnail_url;
  li.append(img);
  return li;
}

function tile(item, extra) {
  const li = thumbnailTile(item);
  const caption = document.createElement("span");
  caption.className = "caption";
  caption.textContent = item.key;
  li.append(caption);
  if (extra) li.append(extra);
  return li;
}

function renderMatches(payload) {
  const list = $("results");
  list.replaceChildren();
  for (const match of payload.matches) {
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = match.score.toFixed(3);
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = `${Math.max(0, match.score) * 100}%`;
    const li = tile(match, score);
    li.append(bar);
    li.title = `#${match.rank} ${match.key}: cosine ${match.score.toFixed(4)}`;
    li.addEventListener("click", () => explainMatch(currentQuery, match));
    list.append(li);
  }
  $("results-title").hidden = false;
  $("results-title").textContent = `Matches (${payload.matches.length})`;
  $("timing").textContent = `${payload.took_ms.toFixed(0)} ms · ${payload.model.name}`;
}

let searchCount = 0; // answers to searches that a newer one replaced are dropped

async function match(form) {
  const search = ++searchCount;
  showError("");
  form.append("k", $("k").value);
  appendFilters(form); // filters.js
  $("timing").textContent = "searching…";
  const response = await fetch("/match", { method: "POST", body: form });
  const payload = response.ok ? await response.json() : await errorText(response);
  if (search !== searchCount) return; // settings changed while this one ran
  $("timing").textContent = "";
  if (!response.ok) {
    showError(payload);
    $("results").replaceChildren();
    return;
  }
  renderMatches(payload);
}

function setPreview(src) {
  $("preview").src = src;
  $("preview").hidden = false;
  $("drop-hint").hidden = true;
}

function searchFile(file) {
  if (!file) return;
  const src = URL.createObjectURL(file);
  setPreview(src);
  currentQuery = { file, src };
  lastQuery = () => {
    const form = new FormData();
    form.append("image", file, file.name);
    return match(form);
  };
  return lastQuery();
}

function searchByKey(key, thumbnailUrl) {
  if (thumbnailUrl) setPreview(thumbnailUrl);
  currentQuery = { key, src: thumbnailUrl };
  lastQuery = () => {
    const form = new FormData();
    form.append("query_key", key);
    return match(form);
  };
  return lastQuery();
}

async function loadGallery() {
  const response = await fetch(`/items?offset=${galleryOffset}&limit=${PAGE_SIZE}`);
  if (!response.ok) {
    showError(await errorText(response));
    return;
  }
  const page = await response.json();
  for (const item of page.items) {
    const li = tile(item);
    li.addEventListener("click", () => searchByKey(item.key, item.thumbnail_url));
    $("gallery").append(li);
    noteFields(item.metadata); // filters.js
  }
  galleryOffset += page.items.length;
  $("count").textContent = `(${page.total} images)`;
  $("more").hidden = galleryOffset >= page.total;
}

async function loadStatus() {
  const response = await fetch("/ready");
  if (!response.ok) {
    $("status").textContent = "the service is still loading…";
    setTimeout(loadStatus, 1000);
    return;
  }
  const ready = await response.json();
  $("status").textContent =
    `${ready.items} images · model ${ready.model.name} · engine ${ready.model.engine}`;
  await loadGallery();
}

function wireDropzone() {
  const zone = $("dropzone");
  $("file").addEventListener("change", (event) => searchFile(event.target.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    zone.addEventListener(name, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    zone.addEventListener(name, () => zone.classList.remove("over"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    searchFile(event.dataTransfer.files[0]);
  });
}

wireDropzone();
$("more").addEventListener("click", loadGallery);
$("k").addEventListener("change", () => lastQuery && lastQuery());
wireFilters(() => lastQuery && lastQuery()); // filters.js
loadStatus();
