// Entry point: the two views (#search, #review, so a reload keeps the view), the access settings
// (bearer token and reviewer name, kept in localStorage), and a health line in the footer.
// `whymatch serve` prints a link ending in #token=…: the page keeps that token and drops it from the address.

import { access, getJSON } from "./api.js";
import { initReview, loadQueue, reviewLoaded } from "./review.js";
import { initSearch } from "./search.js";

const VIEWS = ["search", "review"];
const accessPanel = document.getElementById("access");
const tokenField = document.getElementById("token");
const reviewerField = document.getElementById("reviewer");
const accessState = document.getElementById("access-state");

function activeView() {
  const name = location.hash.replace("#", "");
  return VIEWS.includes(name) ? name : "search";
}

function showView() {
  const active = activeView();
  for (const dialog of document.querySelectorAll("dialog[open]")) dialog.close(); // it belongs to the view left
  for (const name of VIEWS) {
    document.getElementById(`${name}-view`).hidden = name !== active;
    const tab = document.getElementById(`tab-${name}`);
    tab.setAttribute("aria-selected", String(name === active));
    tab.tabIndex = name === active ? 0 : -1;
  }
  if (active === "review" && !reviewLoaded()) loadQueue();
}

function initTabs() {
  const tabs = VIEWS.map((name) => document.getElementById(`tab-${name}`));
  tabs.forEach((tab, n) => {
    tab.addEventListener("click", () => {
      location.hash = VIEWS[n];
    });
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (!step) return;
      event.preventDefault();
      const next = tabs[(n + step + tabs.length) % tabs.length];
      next.focus();
      next.click();
    });
  });
  window.addEventListener("hashchange", showView);
}

function takeTokenFromAddress() {
  const parts = location.hash.replace(/^#/, "").split("&");
  const given = parts.find((part) => part.startsWith("token="));
  if (!given) return;
  access.token = decodeURIComponent(given.slice("token=".length));
  const rest = parts.filter((part) => part !== given).join("&");
  history.replaceState(null, "", `${location.pathname}${location.search}${rest ? `#${rest}` : ""}`);
}

function renderAccessState() {
  accessState.textContent = access.token ? "token set" : "no token";
  accessState.classList.toggle("has-token", Boolean(access.token));
}

function initAccess() {
  tokenField.value = access.token;
  reviewerField.value = access.reviewer;
  tokenField.addEventListener("change", () => {
    access.token = tokenField.value.trim();
    renderAccessState();
  });
  reviewerField.addEventListener("change", () => {
    access.reviewer = reviewerField.value.trim();
  });
  document.getElementById("access-form").addEventListener("submit", (event) => {
    event.preventDefault();
    access.token = tokenField.value.trim();
    access.reviewer = reviewerField.value.trim();
    renderAccessState();
    accessPanel.open = false;
  });
  document.addEventListener("whymatch:need-token", () => {
    accessPanel.open = true;
    tokenField.focus();
  });
  renderAccessState();
}

async function showHealth() {
  const footer = document.getElementById("health");
  try {
    const health = await getJSON("api/health");
    const items = health.items ?? health.n_items;
    footer.textContent = `Server ${health.status || "ok"}${Number.isFinite(items) ? ` · ${items} photos in the catalogue` : ""}`;
  } catch (error) {
    footer.textContent = `Server unavailable: ${error.message}`;
  }
}

takeTokenFromAddress();
initAccess();
initTabs();
initSearch(() => activeView() === "search");
initReview(() => activeView() === "review");
showView();
showHealth();
