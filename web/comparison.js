// The explained comparison: two photos side by side, each with its Grad-CAM map drawn over it
// (factual or counterfactual), an opacity slider, the decision in words, and — when the API sends
// them — the geometric verification (its verified point matches drawn as lines from photo A to
// photo B), the masking effects, the shared concepts and numbered correspondence boxes.

import { colourGradient, drawHeatmap, isValidMap } from "./heatmap.js";
import { setStatus } from "./status.js";

const SIDES = ["a", "b"];
const SVG = "http://www.w3.org/2000/svg";
const BOX_COLOURS = ["#ff4d6d", "#3a86ff", "#ffbe0b", "#8338ec", "#06d6a0", "#fb5607", "#00b4d8", "#e76f51"];
const PRESENT_IN = { both: "in both", a: "only in A", b: "only in B" };
let instances = 0;
let sharedOpacity = 0.5; // the same opacity for every comparison the page shows

export function formatScore(value) {
  return Number.isFinite(value) ? value.toFixed(2) : "–";
}

export function decisionWords(explanation) {
  const match = explanation.is_match ?? explanation.similarity >= explanation.threshold;
  return `${match ? "Match" : "No match"} — similarity ${formatScore(explanation.similarity)} `
    + `(threshold ${formatScore(explanation.threshold)})`;
}

// The geometric verification in words, next to the decision: "verified: 57 inlier matches" (and, when the
// head alone would not have called it a match, that geometry decided), or why it does not verify.
export function verificationWords(explanation) {
  const v = explanation.verification;
  if (!v || !Number.isFinite(v.inliers)) return "";
  const mirrored = v.mirrored ? ", one photo mirrored" : "";
  if (v.verified) {
    const decided = explanation.decided_by === "geometry" ? " — geometry decided the match" : "";
    return `verified: ${v.inliers} inlier matches${mirrored}${decided}`;
  }
  return `not verified: ${v.inliers} inlier match${v.inliers === 1 ? "" : "es"} (${v.min_inliers ?? 8} needed)`;
}

function verifiedLines(explanation) {
  const v = explanation?.verification;
  if (!v?.verified || !Array.isArray(v.lines)) return [];
  return v.lines.filter((line) => Array.isArray(line) && line.length === 4 && line.every(Number.isFinite));
}

function sideName(side) {
  return side.toUpperCase();
}

const FILLED = { blur: "blurred", mean: "filled with its mean colour" };
// The smallest move of the evidence (logit units) worth saying when the similarity does not show it (engine.explain.masking.EVIDENCE_STEP).
const EVIDENCE_STEP = 0.05;

// The masking effect of one map in words, as engine.explain.masking.effect_sentences says it, e.g.
// "Masking the factual region of image B (20% of its area, blurred) lowers the similarity from 0.91 to 0.37."
function effectSentence(mapName, effects, explanation) {
  const entry = effects[mapName];
  const role = mapName.slice(0, -2);
  const side = sideName(mapName.slice(-1));
  if (!entry) return `The ${role} map of image ${side} is empty: nothing to mask.`;
  const details = [
    Number.isFinite(effects.area) ? `${Math.round(effects.area * 100)}% of its area` : "",
    FILLED[effects.fill] || "",
  ].filter(Boolean).join(", ");
  const region = `Masking the ${role} region of image ${side}${details ? ` (${details})` : ""}`;
  const before = explanation.similarity;
  const after = entry.masked_similarity;
  const evidenceMoves = Number.isFinite(entry.evidence_change) && Math.abs(entry.evidence_change) >= EVIDENCE_STEP;
  let verb;
  if (Math.abs(after - before) >= 0.005) {
    verb = `${after > before ? "raises" : "lowers"} the similarity from ${formatScore(before)} to ${formatScore(after)}`;
  } else if (evidenceMoves) {
    // A saturated similarity hides the move; the evidence (its logit) shows it.
    verb = `leaves the similarity at ${formatScore(before)} but ${entry.evidence_change > 0 ? "raises" : "lowers"} the head's `
      + `evidence (its logit) from ${effects.evidence.toFixed(1)} to ${entry.masked_evidence.toFixed(1)}`;
  } else {
    verb = `leaves the similarity at ${formatScore(before)}`;
  }
  const flip = entry.flips ? `, which flips the decision to ${explanation.is_match ? "no match" : "match"}` : "";
  return `${region} ${verb}${flip}.`;
}

export class Comparison {
  constructor(container) {
    const template = document.getElementById("comparison-template");
    this.root = template.content.firstElementChild.cloneNode(true);
    container.replaceChildren(this.root);
    instances += 1;
    this.mode = "factual";
    this.explanation = null;
    this.loads = 0; // setImages calls so far: a slow image of an earlier pair must not replace a newer one
    this.verdict = this.root.querySelector(".verdict");
    this.verification = this.root.querySelector(".verification");
    this.state = this.root.querySelector(".state");
    this.caption = this.root.querySelector(".mode-caption");
    this.controls = this.root.querySelector(".controls");
    this.slider = this.root.querySelector(".opacity input");
    this.sliderValue = this.root.querySelector(".opacity output");
    this.boxesToggle = this.root.querySelector(".boxes-toggle");
    this.boxesInput = this.boxesToggle.querySelector("input");
    this.linesToggle = this.root.querySelector(".lines-toggle");
    this.linesInput = this.linesToggle.querySelector("input");
    this.effects = this.root.querySelector(".effects");
    this.concepts = this.root.querySelector(".concepts");
    this.root.querySelector(".legend-bar").style.background = colourGradient();
    const sideTemplate = document.getElementById("comparison-side-template");
    const pair = this.root.querySelector(".pair");
    this.pair = pair;
    this.lines = pair.querySelector("svg.inlier-lines");
    this.sides = Object.fromEntries(SIDES.map((side) => {
      const figure = pair.appendChild(sideTemplate.content.firstElementChild.cloneNode(true));
      figure.dataset.side = side;
      return [side, {
        img: figure.querySelector("img"),
        canvas: figure.querySelector("canvas"),
        boxes: figure.querySelector("svg"),
        emptyNote: figure.querySelector(".empty-map"),
        title: figure.querySelector(".title"),
        detail: figure.querySelector(".detail"),
        effect: figure.querySelector(".effect"),
      }];
    }));
    for (const radio of this.root.querySelectorAll('input[type="radio"]')) {
      radio.name = `map-mode-${instances}`;
      radio.addEventListener("change", () => {
        if (radio.checked) this.setMode(radio.value);
      });
    }
    this.slider.addEventListener("input", () => this.setOpacity(Number(this.slider.value) / 100));
    this.boxesInput.addEventListener("change", () => this.renderBoxes());
    this.linesInput.addEventListener("change", () => this.renderLines());
    for (const side of SIDES) {
      this.sides[side].img.addEventListener("load", () => this.renderSide(side));
    }
    // The lines join points of two photos laid out by CSS: draw them again whenever the layout changes.
    if (typeof ResizeObserver === "function") new ResizeObserver(() => this.renderLines()).observe(pair);
    this.reset();
  }

  // Photos: {url (string or promise of one), title, detail}. Clears any previous explanation.
  async setImages(images) {
    this.reset();
    const load = ++this.loads;
    await Promise.all(SIDES.map(async (side) => {
      const { img, title, detail } = this.sides[side];
      const image = images[side];
      title.textContent = `${sideName(side)} · ${image.title}`;
      detail.textContent = image.detail || "";
      img.alt = `Image ${sideName(side)}: ${image.title}`;
      img.removeAttribute("src");
      try {
        const url = await image.url;
        if (load === this.loads) img.src = url;
      } catch (error) {
        if (load === this.loads) this.showError(`Image ${sideName(side)} could not be loaded: ${error.message}`);
      }
    }));
  }

  reset() {
    this.explanation = null;
    this.setOpacity(sharedOpacity);
    this.root.classList.remove("is-explained");
    this.verdict.textContent = "";
    this.verdict.className = "verdict";
    this.verification.textContent = "";
    this.verification.className = "verification";
    this.linesToggle.hidden = true;
    this.lines.replaceChildren();
    setStatus(this.state, "done", "");
    this.controls.hidden = true;
    this.caption.textContent = "";
    this.effects.hidden = true;
    this.concepts.hidden = true;
    this.boxesToggle.hidden = true;
    this.boxesInput.checked = false;
    for (const side of SIDES) {
      const parts = this.sides[side];
      parts.canvas.hidden = true;
      parts.emptyNote.hidden = true;
      parts.effect.textContent = "";
      parts.boxes.replaceChildren();
    }
  }

  showLoading(message) {
    setStatus(this.state, "loading", message);
  }

  showError(message) {
    setStatus(this.state, "error", message);
  }

  setExplanation(explanation) {
    this.explanation = explanation;
    setStatus(this.state, "done", "");
    this.root.classList.add("is-explained");
    this.verdict.textContent = decisionWords(explanation);
    this.verdict.className = `verdict ${explanation.is_match ? "is-match" : "is-no-match"}`;
    this.verification.textContent = verificationWords(explanation);
    this.verification.className = `verification${explanation.verification?.verified ? " is-verified" : ""}`;
    this.controls.hidden = false;
    const correspondences = explanation.correspondences || [];
    this.boxesToggle.hidden = correspondences.length === 0;
    this.linesToggle.hidden = verifiedLines(explanation).length === 0;
    this.renderConcepts(explanation.concepts || []);
    this.setMode(this.mode);
  }

  setMode(mode) {
    this.mode = mode;
    for (const radio of this.root.querySelectorAll('input[type="radio"]')) radio.checked = radio.value === mode;
    if (!this.explanation) return;
    const decision = this.explanation.is_match ? "match" : "no match";
    const opposite = this.explanation.is_match ? "no match" : "match";
    this.caption.textContent = mode === "factual"
      ? `Factual maps: the regions that made the model decide “${decision}”.`
      : `Counterfactual maps: the regions that argue for “${opposite}”.`;
    for (const side of SIDES) this.renderSide(side);
    this.renderEffects();
  }

  setOpacity(opacity) {
    sharedOpacity = opacity;
    const percent = Math.round(opacity * 100);
    this.slider.value = String(percent);
    this.sliderValue.value = `${percent}%`;
    this.root.style.setProperty("--heat-opacity", String(opacity));
  }

  mapName(side) {
    return `${this.mode}_${side}`;
  }

  renderSide(side) {
    const parts = this.sides[side];
    if (!this.explanation || !parts.img.naturalWidth) return;
    const name = this.mapName(side);
    const rows = this.explanation[name];
    const empty = (this.explanation.empty_maps || []).includes(name) || !isValidMap(rows);
    parts.emptyNote.hidden = !empty;
    parts.canvas.hidden = empty;
    if (!empty) drawHeatmap(parts.canvas, rows, parts.img.naturalWidth / parts.img.naturalHeight);
    parts.canvas.dataset.map = name;
    this.renderBoxes();
    this.renderLines();
  }

  // The verified point matches (original-image pixels) as lines from photo A to photo B, drawn in the pair's
  // own CSS pixels: each end is placed where its photo is shown now, whatever the layout (side by side or stacked).
  renderLines() {
    const lines = this.linesInput.checked ? verifiedLines(this.explanation) : [];
    const shown = SIDES.map((side) => this.sides[side].img);
    this.lines.replaceChildren();
    if (lines.length === 0 || shown.some((img) => !img.naturalWidth)) return;
    const origin = this.pair.getBoundingClientRect();
    const [place, placeB] = shown.map((img) => {
      const box = img.getBoundingClientRect();
      const sx = box.width / img.naturalWidth;
      const sy = box.height / img.naturalHeight;
      return (x, y) => [box.left - origin.left + x * sx, box.top - origin.top + y * sy];
    });
    for (const [xa, ya, xb, yb] of lines) {
      const [x1, y1] = place(xa, ya);
      const [x2, y2] = placeB(xb, yb);
      const line = document.createElementNS(SVG, "line");
      Object.entries({ x1, y1, x2, y2 }).forEach(([k, v]) => line.setAttribute(k, v.toFixed(1)));
      this.lines.append(line);
      for (const [cx, cy] of [[x1, y1], [x2, y2]]) {
        const dot = document.createElementNS(SVG, "circle");
        Object.entries({ cx: cx.toFixed(1), cy: cy.toFixed(1), r: 2 }).forEach(([k, v]) => dot.setAttribute(k, v));
        this.lines.append(dot);
      }
    }
  }

  renderEffects() {
    const effects = this.explanation.effects;
    const list = this.effects.querySelector("ul");
    list.replaceChildren();
    for (const side of SIDES) this.sides[side].effect.textContent = "";
    this.effects.hidden = !effects;
    if (!effects) return;
    for (const side of SIDES) {
      const name = this.mapName(side);
      const entry = effects[name];
      if (entry && Number.isFinite(entry.masked_similarity)) {
        this.sides[side].effect.textContent = `masking this ${this.mode} region: `
          + `${formatScore(this.explanation.similarity)} → ${formatScore(entry.masked_similarity)}${entry.flips ? " (flips the decision)" : ""}`;
      }
      const item = document.createElement("li");
      item.textContent = effectSentence(name, effects, this.explanation);
      list.append(item);
    }
  }

  renderConcepts(concepts) {
    const list = this.concepts.querySelector("ul");
    list.replaceChildren(...concepts.map((concept) => {
      const chip = document.createElement("li");
      chip.className = `chip present-${concept.present_in || "both"}`;
      const share = Number.isFinite(concept.share) ? ` ${Math.round(concept.share * 100)}%` : "";
      chip.textContent = `${concept.name}${share}`;
      const where = PRESENT_IN[concept.present_in];
      if (where) {
        const note = document.createElement("span");
        note.className = "chip-note";
        note.textContent = ` ${where}`;
        chip.append(note);
      }
      return chip;
    }));
    this.concepts.hidden = concepts.length === 0;
  }

  // Numbered boxes, in original-image pixels, on both photos (an SVG whose viewBox is the photo).
  renderBoxes() {
    const show = this.boxesInput.checked && this.explanation;
    for (const side of SIDES) {
      const { boxes, img } = this.sides[side];
      boxes.replaceChildren();
      boxes.hidden = !show;
      if (!show || !img.naturalWidth) continue;
      const width = img.naturalWidth;
      const height = img.naturalHeight;
      boxes.setAttribute("viewBox", `0 0 ${width} ${height}`);
      const fontSize = Math.max(12, Math.round(Math.max(width, height) / 22));
      (this.explanation.correspondences || []).forEach((pair, n) => {
        const box = pair[`box_${side}`];
        if (!Array.isArray(box) || box.length !== 4) return;
        const [x0, y0, x1, y1] = box;
        const colourOf = BOX_COLOURS[n % BOX_COLOURS.length];
        const rect = document.createElementNS(SVG, "rect");
        Object.entries({ x: x0, y: y0, width: x1 - x0, height: y1 - y0, stroke: colourOf }).forEach(([k, v]) => rect.setAttribute(k, v));
        const label = document.createElementNS(SVG, "text");
        Object.entries({ x: x0 + fontSize * 0.3, y: y0 + fontSize, fill: colourOf, "font-size": fontSize }).forEach(([k, v]) => label.setAttribute(k, v));
        label.textContent = String(pair.rank ?? n + 1);
        const title = document.createElementNS(SVG, "title");
        title.textContent = Number.isFinite(pair.share) ? `${label.textContent}: ${Math.round(pair.share * 100)}% of the match` : label.textContent;
        rect.append(title);
        boxes.append(rect, label);
      });
    }
  }
}
