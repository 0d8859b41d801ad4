// Why a match matches: query and match side by side, heat maps over both (red adds to the
// cosine, blue takes from it) and the strongest region pairs linked. Asks POST /explain.
// app.js calls explainMatch(query, match) when a match is clicked; query is {file} or {key}.
"use strict";

const EXPLAIN_BOX = 256; // px per image: the model's centre square
const EXPLAIN_GAP = 96;
const EXPLAIN_LINKS = 5;
const SVG_NS = "http://www.w3.org/2000/svg";
let explainQuery = null;

function explainPanel() {
  return document.getElementById("explain");
}

function explainBox(id, caption) {
  const figure = document.createElement("figure");
  figure.className = "explain-image";
  const base = document.createElement("img");
  base.id = `${id}-image`;
  base.alt = caption;
  const heat = document.createElement("img");
  heat.id = `${id}-heat`;
  heat.className = "heat";
  heat.alt = "";
  const label = document.createElement("figcaption");
  label.id = `${id}-caption`;
  label.textContent = caption;
  figure.append(base, heat, label);
  return figure;
}

function buildExplainPanel() {
  const panel = document.createElement("section");
  panel.id = "explain";
  panel.hidden = true;
  panel.innerHTML = `
    <h2>Why it matches <span id="explain-score" class="count"></span></h2>
    <div class="explain-controls">
      <label><input id="explain-toggle" type="checkbox" checked> heat maps and region pairs</label>
      <button id="explain-search" type="button">search with this image</button>
      <button id="explain-close" type="button">close</button>
    </div>
    <p id="explain-method" class="timing"></p>`;
  const pair = document.createElement("div");
  pair.className = "explain-pair";
  pair.style.width = `${2 * EXPLAIN_BOX + EXPLAIN_GAP}px`;
  pair.append(explainBox("explain-query", "query"), explainBox("explain-match", "match"));
  pair.lastChild.style.left = `${EXPLAIN_BOX + EXPLAIN_GAP}px`;
  const links = document.createElementNS(SVG_NS, "svg");
  links.id = "explain-links";
  links.setAttribute("width", 2 * EXPLAIN_BOX + EXPLAIN_GAP);
  links.setAttribute("height", EXPLAIN_BOX);
  pair.append(links);
  panel.append(pair);
  document.getElementById("results").closest("section").after(panel);
  document.getElementById("explain-toggle").addEventListener("change", (event) => {
    panel.classList.toggle("plain", !event.target.checked);
  });
  document.getElementById("explain-close").addEventListener("click", () => {
    panel.hidden = true;
  });
  return panel;
}

function regionCentre(region, grid, offset) {
  const cell = EXPLAIN_BOX / grid;
  return [offset + (region[1] + 0.5) * cell, (region[0] + 0.5) * cell];
}

function drawLinks(explanation) {
  const svg = document.getElementById("explain-links");
  svg.replaceChildren();
  explanation.pairs.slice(0, EXPLAIN_LINKS).forEach((pair, index) => {
    const [x1, y1] = regionCentre(pair.query, explanation.grid, 0);
    const [x2, y2] = regionCentre(pair.match, explanation.grid, EXPLAIN_BOX + EXPLAIN_GAP);
    const line = document.createElementNS(SVG_NS, "line");
    Object.entries({ x1, y1, x2, y2, class: "link" }).forEach(([k, v]) => line.setAttribute(k, v));
    const title = document.createElementNS(SVG_NS, "title");
    title.textContent = `pair ${index + 1}: +${pair.contribution.toFixed(4)}`;
    line.append(title);
    svg.append(line);
    for (const [x, y] of [[x1, y1], [x2, y2]]) {
      const dot = document.createElementNS(SVG_NS, "circle");
      Object.entries({ cx: x, cy: y, r: 9, class: "link-end" }).forEach(([k, v]) => dot.setAttribute(k, v));
      const number = document.createElementNS(SVG_NS, "text");
      Object.entries({ x, y: y + 4, class: "link-number" }).forEach(([k, v]) => number.setAttribute(k, v));
      number.textContent = index + 1;
      svg.append(dot, number);
    }
  });
}

async function explainMatch(query, match) {
  explainQuery = query;
  const panel = explainPanel() || buildExplainPanel();
  panel.hidden = false;
  panel.dataset.key = match.key;
  panel.classList.add("loading");
  document.getElementById("explain-score").textContent = "explaining…";
  document.getElementById("explain-query-image").src = query.src || "";
  document.getElementById("explain-match-image").src = match.thumbnail_url || "";
  document.getElementById("explain-match-caption").textContent = match.key;
  document.getElementById("explain-query-caption").textContent = query.key || query.file.name;
  const form = new FormData();
  if (query.file) form.append("image_a", query.file, query.file.name);
  else form.append("key_a", query.key);
  form.append("key_b", match.key);
  const response = await fetch("/explain", { method: "POST", body: form });
  panel.classList.remove("loading");
  if (!response.ok) {
    document.getElementById("explain-score").textContent = "";
    showError(await errorText(response));
    return;
  }
  const { explanation, took_ms: took } = await response.json();
  document.getElementById("explain-query-heat").src = explanation.query_overlay;
  document.getElementById("explain-match-heat").src = explanation.match_overlay;
  document.getElementById("explain-score").textContent = `cosine ${explanation.score.toFixed(3)}`;
  const method = explanation.exact ? "exact split" : "approximation (occlusion)";
  document.getElementById("explain-method").textContent =
    `${method} · engine ${explanation.engine} · ${took.toFixed(0)} ms · red adds to the score, ` +
    "blue takes from it; numbered lines join the strongest region pairs";
  drawLinks(explanation);
  panel.scrollIntoView({ block: "nearest" });
}

document.addEventListener("click", (event) => {
  if (event.target.id === "explain-search" && explainPanel()) {
    const key = explainPanel().dataset.key;
    searchByKey(key, `/thumbnails/${encodeURI(key)}`);
  }
});
