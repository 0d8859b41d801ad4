// The duplicates view: near-duplicate groups with thumbnails and scores; keep one image of a
// group and remove the others (DELETE /items/{key}, with the API key when the service needs
// one), as Immich's duplicate review does. Pages come from GET /duplicates by cursor.
// Loaded after app.js, whose errorText and thumbnailTile it uses.
"use strict";

const dupes = {
  after: null,
  el: (id) => document.getElementById(id),
};

function keyPath(key) {
  return key.split("/").map(encodeURIComponent).join("/");
}

function dupError(message) {
  const box = dupes.el("dup-error");
  box.textContent = message;
  box.hidden = !message;
}

function dupTile(item, name, checked) {
  const li = thumbnailTile(item);
  li.classList.add("dup-tile");
  const label = document.createElement("label");
  label.className = "caption";
  const radio = document.createElement("input");
  radio.type = "radio";
  radio.name = name;
  radio.value = item.key;
  radio.checked = checked;
  label.append(radio, ` keep ${item.key}`);
  li.append(label);
  return li;
}

function renderGroup(group, number) {
  const box = document.createElement("article");
  box.className = "dup-group";
  box.dataset.anchor = group.anchor;
  const title = document.createElement("h3");
  title.textContent = `${group.items.length} images · weakest pair ${group.score.toFixed(3)}`;
  const list = document.createElement("ul");
  list.className = "grid";
  group.items.forEach((item, n) => list.append(dupTile(item, `keep-${number}`, n === 0)));
  const pairs = document.createElement("p");
  pairs.className = "dup-pairs";
  pairs.textContent = group.pairs
    .map((p) => `${p.a} ~ ${p.b}: ${p.score.toFixed(3)} (cosine ${p.cosine.toFixed(3)})`)
    .join(" · ");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "dup-resolve";
  button.textContent = `Keep selected, remove ${group.items.length - 1}`;
  button.addEventListener("click", () => resolveGroup(box, group));
  box.append(title, list, pairs, button);
  return box;
}

async function resolveGroup(box, group) {
  const keep = box.querySelector("input[type=radio]:checked").value;
  const headers = {};
  const apiKey = dupes.el("dup-api-key").value;
  if (apiKey) headers["X-API-Key"] = apiKey;
  dupError("");
  for (const item of group.items) {
    if (item.key === keep) continue;
    const response = await fetch(`/items/${keyPath(item.key)}`, { method: "DELETE", headers });
    if (!response.ok && response.status !== 404) {
      dupError(`could not remove ${item.key}: ${await errorText(response)}`);
      return;
    }
    box.querySelector(`li[data-key="${CSS.escape(item.key)}"]`)?.remove();
  }
  box.remove();
  dupes.el("dup-summary").textContent = `kept ${keep}`;
}

async function loadDuplicates(reset) {
  if (reset) {
    dupes.after = null;
    dupes.el("dup-groups").replaceChildren();
  }
  const params = new URLSearchParams({ limit: "10" });
  if (dupes.after) params.set("after", dupes.after);
  const threshold = dupes.el("dup-threshold").value;
  if (threshold) params.set("threshold", threshold);
  dupError("");
  const response = await fetch(`/duplicates?${params}`);
  if (!response.ok) {
    dupError(await errorText(response));
    return;
  }
  const page = await response.json();
  const groups = dupes.el("dup-groups");
  const start = groups.children.length;
  page.groups.forEach((group, n) => groups.append(renderGroup(group, start + n)));
  dupes.after = page.next_after;
  dupes.el("dup-more").hidden = !page.next_after;
  dupes.el("dup-summary").textContent = groups.children.length
    ? `${groups.children.length} groups shown, threshold ${page.threshold.toFixed(2)}` +
      (page.calibrated ? " (calibrated)" : "")
    : "no near-duplicates";
}

dupes.el("show-duplicates").addEventListener("click", () => {
  const view = dupes.el("duplicates");
  view.hidden = !view.hidden;
  if (!view.hidden) loadDuplicates(true);
});
dupes.el("dup-more").addEventListener("click", () => loadDuplicates(false));
dupes.el("dup-reload").addEventListener("click", () => loadDuplicates(true));
