// Query by image: drop, paste or choose a photo; the catalogue's best matches re-ranked by the
// Siamese head; a match opens the explained comparison in a dialog, from which "More like this"
// searches again with that catalogue item as the query (its stored embedding: nothing uploaded).

import { imageURL, postForm } from "./api.js";
import { Comparison, formatScore } from "./comparison.js";
import { setStatus } from "./status.js";

const form = document.getElementById("search-form");
const fileInput = document.getElementById("query-file");
const dropzone = document.getElementById("dropzone");
const preview = document.getElementById("query-preview");
const kSelect = document.getElementById("k");
const explainBox = document.getElementById("explain");
const verifyBox = document.getElementById("verify");
const status = document.getElementById("search-status");
const results = document.getElementById("results");
const dialog = document.getElementById("compare-dialog");
const dialogTitle = document.getElementById("compare-title");
const comparison = new Comparison(dialog.querySelector(".comparison-slot"));

let query = null; // an upload {blob, url, name} or a catalogue item {item, url, name}
let shownMatch = null; // the match the dialog explains
let latestRun = 0; // responses of superseded searches are dropped
let latestOpened = 0; // likewise explanations of a match the dialog no longer shows

function useQuery(next) {
  if (query?.blob) URL.revokeObjectURL(query.url); // item images stay in api.js's cache
  query = next;
  preview.src = query.url;
  preview.alt = query.item ? `Catalogue ${query.name}` : `Your photo: ${query.name}`;
  dropzone.classList.add("has-image");
  runSearch();
}

function setQuery(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    setStatus(status, "error", `“${file.name}” is not an image: choose a JPEG, PNG or WebP photo.`);
    return;
  }
  useQuery({ blob: file, url: URL.createObjectURL(file), name: file.name || "pasted image" });
}

// The query as form fields: the catalogue item's id, or the uploaded photo.
function queryFields(itemField, imageField) {
  return query.item ? { [itemField]: query.item } : { [imageField]: query.blob };
}

async function searchLike(match) {
  dialog.close();
  try {
    useQuery({ item: match.item_id, url: await imageURL(match.image_url), name: `item ${match.item_id}` });
  } catch (error) {
    setStatus(status, "error", error.message);
  }
}

function reranking(match) {
  const moved = match.rank_before - match.rank_after;
  if (moved > 0) return { text: `↑${moved}`, className: "up", words: `up ${moved} from rank ${match.rank_before} by index similarity` };
  if (moved < 0) return { text: `↓${-moved}`, className: "down", words: `down ${-moved} from rank ${match.rank_before} by index similarity` };
  return { text: "=", className: "same", words: "same rank as by index similarity" };
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function resultCard(match, threshold) {
  const move = reranking(match);
  const verdict = match.is_match ? "match" : "no match";
  const verified = match.verification?.verified;
  const geometry = verified ? `, verified by ${match.verification.inliers} inlier matches` : "";
  const button = element("button", "result-button");
  button.type = "button";
  button.setAttribute("aria-label", `Rank ${match.rank_after}: item ${match.item_id}, head score ${formatScore(match.head_score)}, `
    + `${verdict}${geometry}, ${move.words}. Open the explanation.`);

  const thumb = element("span", "thumb");
  const img = element("img");
  img.alt = "";
  imageURL(match.image_url).then((url) => { img.src = url; }, () => thumb.classList.add("is-broken"));
  thumb.append(img);

  const top = element("span", "result-top");
  const moveBadge = element("span", `move ${move.className}`, move.text);
  moveBadge.title = `rank ${match.rank_before} by index similarity → ${match.rank_after} by the head`;
  top.append(element("span", "rank", `#${match.rank_after}`), moveBadge,
    element("span", `badge ${match.is_match ? "is-match" : "is-no-match"}`, verdict));
  if (verified) {
    const badge = element("span", "verified-badge", "✓ verified");
    badge.title = `${match.verification.inliers} point matches one homography explains`
      + (match.decided_by === "geometry" ? ": geometry decided the match" : "");
    top.append(badge);
  }

  const bar = element("span", "score-bar");
  bar.style.setProperty("--score", String(Math.max(0, Math.min(1, match.head_score))));
  bar.style.setProperty("--threshold", String(threshold));
  bar.append(element("span", "score-fill"), element("span", "score-threshold"));

  const numbers = element("span", "numbers");
  const head = element("span", "head-score", "head ");
  head.append(element("strong", "", formatScore(match.head_score)));
  numbers.append(head, element("span", "index-score", `index ${formatScore(match.index_similarity)} (#${match.rank_before})`));

  const body = element("span", "result-body");
  body.append(top, bar, numbers, element("span", "listing", match.listing || `item ${match.item_id}`));
  button.append(thumb, body);
  button.addEventListener("click", () => openMatch(match));
  const item = element("li", "result");
  item.append(button);
  return item;
}

function render(body) {
  const { matches } = body;
  results.replaceChildren(...matches.map((match) => resultCard(match, body.threshold)));
  if (matches.length === 0) {
    setStatus(status, "empty", body.index_size > 0
      ? "No matches: the catalogue holds no other photos yet. Add some with “whymatch index PHOTOS/”."
      : "No matches: nothing in the catalogue is indexed with the server's model yet. Run “whymatch index PHOTOS/” with it.");
    return;
  }
  const identical = body.excluded.length;
  const leftOut = identical ? ` ${identical} catalogue photo${identical > 1 ? "s are" : " is"} the query itself, left out.` : "";
  setStatus(status, "done", `${matches.length} matches among ${body.n_candidates} candidates, re-ranked by the Siamese head `
    + `(threshold ${formatScore(body.threshold)}).${leftOut} Select one to see why.`);
}

async function runSearch() {
  if (!query) {
    setStatus(status, "error", "Choose, drop or paste a photo first.");
    return;
  }
  const run = ++latestRun;
  const explain = explainBox.checked;
  const verify = verifyBox.checked;
  results.setAttribute("aria-busy", "true");
  setStatus(status, "loading", explain || verify
    ? "Searching and explaining on CPU, this takes a few seconds…"
    : "Searching…");
  try {
    const body = await postForm("api/search", { ...queryFields("item", "image"), k: kSelect.value, explain, verify });
    if (run !== latestRun) return;
    render(body);
  } catch (error) {
    if (run !== latestRun) return;
    results.replaceChildren();
    setStatus(status, "error", error.message);
  } finally {
    if (run === latestRun) results.removeAttribute("aria-busy");
  }
}

async function openMatch(match) {
  const opened = ++latestOpened;
  shownMatch = match;
  dialogTitle.textContent = `Why rank ${match.rank_after}: item ${match.item_id}`;
  if (!dialog.open) dialog.showModal();
  const named = query.item ? { title: query.name, detail: "the query" } : { title: "your photo", detail: query.name };
  await comparison.setImages({
    a: { url: query.url, ...named },
    b: { url: imageURL(match.image_url), title: `item ${match.item_id}`, detail: match.listing || "" },
  });
  if (opened !== latestOpened) return;
  if (match.explanation) {
    comparison.setExplanation(match.explanation);
    return;
  }
  comparison.showLoading("Explaining on CPU, this takes a few seconds…");
  try {
    match.explanation = await postForm("api/compare", { ...queryFields("item_a", "image_a"), item_b: match.item_id });
    if (opened === latestOpened) comparison.setExplanation(match.explanation);
  } catch (error) {
    if (opened === latestOpened) comparison.showError(error.message);
  }
}

export function initSearch(isActive) {
  fileInput.addEventListener("change", () => setQuery(fileInput.files[0]));
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    runSearch();
  });
  kSelect.addEventListener("change", () => query && runSearch());
  explainBox.addEventListener("change", () => query && runSearch());
  verifyBox.addEventListener("change", () => query && runSearch());
  for (const type of ["dragenter", "dragover"]) {
    dropzone.addEventListener(type, (event) => {
      event.preventDefault();
      dropzone.classList.add("is-dragging");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    dropzone.addEventListener(type, () => dropzone.classList.remove("is-dragging"));
  }
  dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    setQuery(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    if (!isActive()) return;
    const file = [...(event.clipboardData?.files || [])].find((f) => f.type.startsWith("image/"));
    if (!file) return;
    event.preventDefault();
    setQuery(file);
  });
  dialog.querySelector(".dialog-close").addEventListener("click", () => dialog.close());
  dialog.querySelector(".dialog-more").addEventListener("click", () => shownMatch && searchLike(shownMatch));
  dialog.addEventListener("click", (event) => {
    if (event.target === dialog) dialog.close(); // a click on the backdrop
  });
}
