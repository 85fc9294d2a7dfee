// The duplicate review queue: the latest dedup run's pairs (or an earlier run's, picked from the list),
// strongest first, each with its explained comparison; accept / reject / skip with buttons or keys
// (A, R, S, ← →); decisions are stored through POST /api/reviews, so a reload shows them as reviewed.

import { getJSON, imageURL, postForm, postJSON } from "./api.js";
import { Comparison, formatScore } from "./comparison.js";
import { setStatus } from "./status.js";

const PAGE = 200;
const DECISION_WORDS = { accept: "accepted", reject: "rejected" };
const DECISION_OF_STATUS = { accepted: "accept", rejected: "reject" };

const status = document.getElementById("review-status");
const progressText = document.getElementById("review-progress-text");
const progressBar = document.getElementById("review-progress");
const queueList = document.getElementById("queue-list");
const pairPanel = document.getElementById("review-pair");
const pairTitle = document.getElementById("review-pair-title");
const pairState = document.getElementById("review-pair-state");
const noteField = document.getElementById("review-note");
const buttons = {
  accept: document.getElementById("review-accept"),
  reject: document.getElementById("review-reject"),
  skip: document.getElementById("review-skip"),
  previous: document.getElementById("review-previous"),
  next: document.getElementById("review-next"),
};
const comparison = new Comparison(document.getElementById("review-comparison"));
const runPicker = document.getElementById("review-run-picker");
const runSelect = document.getElementById("review-run");

let pairs = [];
let current = -1;
let busy = false;
let loaded = false;
let chosenRun = null; // a run id picked from the list; null follows the latest run
const explanations = new Map(); // "a-b" → promise of the compare response

const keyOf = (pair) => `${pair.item_a}-${pair.item_b}`;

function listingOf(pair, side) {
  return pair[`listing_${side}`] || `item ${pair[`item_${side}`]}`;
}

// GET /api/duplicates pairs, flattened to what the queue shows.
function queuePair(pair) {
  return {
    item_a: pair.item_a.id,
    item_b: pair.item_b.id,
    listing_a: pair.item_a.listing,
    listing_b: pair.item_b.listing,
    image_a: pair.item_a.image_url,
    image_b: pair.item_b.image_url,
    head_score: pair.head_score,
    exact: pair.exact,
    verified: pair.verified,
    review: DECISION_OF_STATUS[pair.status] || null,
  };
}

// Every pair of the chosen dedup run (the latest unless one was picked), strongest first, whatever
// its status: the queue shows the reviewed ones too, so progress and earlier decisions stay visible
// after a reload. Returns them with the run they come from (null before any run).
async function fetchAllPairs() {
  const all = [];
  let total = Infinity;
  let run = null;
  while (all.length < total) {
    const runParam = chosenRun === null ? "" : `&run=${chosenRun}`;
    const body = await getJSON(`api/duplicates?status=all&offset=${all.length}&limit=${PAGE}${runParam}`);
    all.push(...body.pairs.map(queuePair));
    total = body.total;
    run = body.run;
    if (body.pairs.length === 0) break;
  }
  return { pairs: all, run };
}

function runTime(run) {
  return new Date(run.created_at).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

// Which run the queue shows, so a reviewer knows how fresh it is and what threshold kept its pairs.
function describeRun(run) {
  return `dedup run ${run.id} of ${runTime(run)}, threshold ${run.threshold.toFixed(3)} (${run.threshold_source})`;
}

// The list of runs to pick from (the newest 50), the shown one selected; hidden before any run.
async function loadRuns(shown) {
  const { runs } = await getJSON("api/duplicates/runs?limit=50");
  runPicker.hidden = runs.length === 0;
  runSelect.replaceChildren(...runs.map((run, n) => {
    const latest = n === 0 ? " (latest)" : "";
    const option = new Option(`Run ${run.id}${latest} · ${run.n_pairs} pairs`, String(run.id));
    option.title = describeRun(run); // the time and threshold; the status line shows them for the chosen run
    return option;
  }));
  if (shown) runSelect.value = String(shown.id);
}

function reviewedCount() {
  return pairs.filter((pair) => pair.review).length;
}

function renderProgress() {
  const reviewed = reviewedCount();
  progressText.textContent = `${reviewed} of ${pairs.length} reviewed`;
  progressBar.max = Math.max(1, pairs.length);
  progressBar.value = reviewed;
}

function renderQueue() {
  queueList.replaceChildren(...pairs.map((pair, n) => {
    const item = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = `queue-item${n === current ? " is-current" : ""}${pair.review ? ` is-${pair.review}` : ""}`;
    if (n === current) button.setAttribute("aria-current", "true");
    const state = pair.review ? DECISION_WORDS[pair.review] : "unreviewed";
    button.setAttribute("aria-label", `Pair ${n + 1}: ${listingOf(pair, "a")} and ${listingOf(pair, "b")}, score ${formatScore(pair.head_score)}, ${state}`);
    const score = document.createElement("span");
    score.className = "queue-score";
    score.textContent = formatScore(pair.head_score);
    const names = document.createElement("span");
    names.className = "queue-names";
    for (const side of ["a", "b"]) {
      const name = document.createElement("span");
      name.textContent = listingOf(pair, side);
      names.append(name);
    }
    const badge = document.createElement("span");
    badge.className = `queue-state state-${pair.review || "unreviewed"}`;
    badge.textContent = state;
    button.append(score, names, badge);
    button.addEventListener("click", () => show(n));
    item.append(button);
    return item;
  }));
  queueList.querySelector(".is-current")?.scrollIntoView({ block: "nearest" });
}

function nextUnreviewed(after) {
  for (let step = 1; step <= pairs.length; step += 1) {
    const n = (after + step) % pairs.length;
    if (!pairs[n].review) return n;
  }
  return -1;
}

function explanationOf(pair) {
  const key = keyOf(pair);
  if (!explanations.has(key)) {
    const loading = postForm("api/compare", { item_a: pair.item_a, item_b: pair.item_b });
    loading.catch(() => explanations.delete(key)); // a failed explanation is asked for again next time
    explanations.set(key, loading);
  }
  return explanations.get(key);
}

async function show(n) {
  if (n < 0 || n >= pairs.length) return;
  current = n;
  const pair = pairs[n];
  renderQueue();
  pairPanel.hidden = false;
  pairTitle.textContent = `Pair ${n + 1} of ${pairs.length}${pair.exact ? " · identical files" : pair.verified ? " · geometrically verified" : ""}`;
  pairState.textContent = pair.review ? `You ${DECISION_WORDS[pair.review]} this pair.` : "Not reviewed yet.";
  pairState.className = `pair-state state-${pair.review || "unreviewed"}`;
  noteField.value = "";
  buttons.previous.disabled = n === 0;
  buttons.next.disabled = n === pairs.length - 1;
  await comparison.setImages({
    a: { url: imageURL(pair.image_a), title: `item ${pair.item_a}`, detail: listingOf(pair, "a") },
    b: { url: imageURL(pair.image_b), title: `item ${pair.item_b}`, detail: listingOf(pair, "b") },
  });
  if (current !== n) return;
  comparison.showLoading("Explaining on CPU, this takes a few seconds…");
  try {
    const body = await explanationOf(pair);
    if (current !== n) return;
    comparison.setExplanation(body);
    const next = nextUnreviewed(n);
    if (next !== -1) explanationOf(pairs[next]).catch(() => {}); // ready before the reviewer gets there
  } catch (error) {
    if (current === n) comparison.showError(error.message);
  }
}

async function decide(decision) {
  const pair = pairs[current];
  if (!pair || busy) return;
  busy = true;
  setStatus(status, "loading", `Saving “${decision}”…`);
  try {
    await postJSON("api/reviews", {
      item_a: pair.item_a,
      item_b: pair.item_b,
      decision,
      note: noteField.value.trim() || null,
      reviewer: document.getElementById("reviewer").value.trim() || "web",
    });
    pair.review = decision;
    renderProgress();
    const reviewed = reviewedCount();
    setStatus(status, "done", `Pair ${current + 1} ${DECISION_WORDS[decision]}. ${reviewed} of ${pairs.length} reviewed.`);
    advance();
  } catch (error) {
    setStatus(status, "error", error.message);
  } finally {
    busy = false;
  }
}

function advance() {
  const next = nextUnreviewed(current);
  if (next === -1) {
    renderQueue();
    setStatus(status, "done", `All ${pairs.length} pairs reviewed.`);
    return;
  }
  show(next);
}

export async function loadQueue() {
  setStatus(status, "loading", "Loading the duplicate pairs…");
  queueList.setAttribute("aria-busy", "true");
  let run;
  try {
    ({ pairs, run } = await fetchAllPairs());
    await loadRuns(run);
  } catch (error) {
    setStatus(status, "error", error.message);
    return;
  } finally {
    queueList.removeAttribute("aria-busy");
  }
  loaded = true;
  explanations.clear();
  renderProgress();
  if (pairs.length === 0) {
    queueList.replaceChildren();
    pairPanel.hidden = true;
    setStatus(status, "empty", run
      ? `No duplicate pairs in ${describeRun(run)}.`
      : "No duplicate pairs to review: press “Find duplicates” (or run “whymatch dedup”).");
    return;
  }
  const first = nextUnreviewed(-1);
  setStatus(status, "done", first === -1
    ? `All ${pairs.length} pairs reviewed — ${describeRun(run)}.`
    : `${pairs.length - reviewedCount()} pairs to review, strongest first — ${describeRun(run)}.`);
  show(first === -1 ? 0 : first);
}

// A new dedup run (the stored calibration, else the model's duplicate threshold); it becomes the queue.
async function findDuplicates() {
  setStatus(status, "loading", "Finding duplicates across the catalogue on CPU, this can take a while…");
  try {
    const { run } = await postJSON("api/duplicates/run", {});
    setStatus(status, "done", `Found ${run.n_pairs} duplicate pairs in ${run.n_groups} groups.`);
  } catch (error) {
    setStatus(status, "error", error.message);
    return;
  }
  chosenRun = null;
  await loadQueue();
}

export function initReview(isActive) {
  buttons.accept.addEventListener("click", () => decide("accept"));
  buttons.reject.addEventListener("click", () => decide("reject"));
  buttons.skip.addEventListener("click", advance);
  buttons.previous.addEventListener("click", () => show(current - 1));
  buttons.next.addEventListener("click", () => show(current + 1));
  document.getElementById("review-reload").addEventListener("click", loadQueue);
  runSelect.addEventListener("change", () => {
    // Picking the newest run follows the latest from then on, as before any pick.
    chosenRun = runSelect.selectedIndex === 0 ? null : Number(runSelect.value);
    loadQueue();
  });
  document.getElementById("review-find").addEventListener("click", findDuplicates);
  document.addEventListener("keydown", (event) => {
    if (!isActive() || !loaded || current < 0 || event.defaultPrevented) return; // e.g. arrows on the tabs
    if (event.altKey || event.ctrlKey || event.metaKey || event.repeat) return;
    if (event.target.closest("input, textarea, select, [contenteditable], dialog[open]")) return;
    const action = {
      a: () => decide("accept"),
      r: () => decide("reject"),
      s: advance,
      ArrowLeft: () => show(current - 1),
      ArrowRight: () => show(current + 1),
    }[event.key.length === 1 ? event.key.toLowerCase() : event.key];
    if (!action) return;
    event.preventDefault();
    action();
  });
}

export function reviewLoaded() {
  return loaded;
}
