// Search filters on the page: one metadata condition (field, operator, value), "added
// within", and a minimum score. They become the same `where` JSON and `min_score` form
// fields that every other /match client sends, so the server checks them in one place.
"use strict";

const knownFields = new Set();

// A typed value as in the CLI's --where: JSON when it reads as a JSON scalar, else the text.
function filterValue(text) {
  try {
    const value = JSON.parse(text);
    if (value === null || ["string", "number", "boolean"].includes(typeof value)) return value;
  } catch {
    // not JSON: plain text
  }
  return text;
}

function whereFilter() {
  const where = {};
  const field = document.getElementById("filter-field").value.trim();
  const text = document.getElementById("filter-value").value.trim();
  const op = document.getElementById("filter-op").value;
  if (field && text) {
    if (op === "eq") where[field] = filterValue(text);
    else if (op === "in") where[field] = { in: text.split(",").map((v) => filterValue(v.trim())) };
    else where[field] = { [op]: filterValue(text) };
  }
  const added = document.getElementById("filter-added").value;
  if (added) where.added = { ...(where.added || {}), gte: added };
  return where;
}

// Adds the filter fields to a /match form (nothing when no filter is set).
function appendFilters(form) {
  const where = whereFilter();
  if (Object.keys(where).length) form.append("where", JSON.stringify(where));
  const minScore = Number(document.getElementById("min-score").value);
  if (minScore > 0) form.append("min_score", String(minScore));
}

// Offers the metadata fields the collection's items have as suggestions for the field box.
function noteFields(metadata) {
  const list = document.getElementById("filter-fields");
  for (const name of Object.keys(metadata || {})) {
    if (knownFields.has(name)) continue;
    knownFields.add(name);
    const option = document.createElement("option");
    option.value = name;
    list.append(option);
  }
}

function showMinScore() {
  const value = Number(document.getElementById("min-score").value);
  document.getElementById("min-score-value").textContent = value > 0 ? value.toFixed(2) : "off";
}

// Re-runs the last search when a filter changes (the slider when it is let go).
function wireFilters(rerun) {
  const slider = document.getElementById("min-score");
  slider.addEventListener("input", showMinScore);
  slider.addEventListener("change", rerun);
  for (const id of ["filter-op", "filter-added", "filter-field", "filter-value"]) {
    document.getElementById(id).addEventListener("change", rerun);
  }
  showMinScore();
}
