// The whymatch REST API as seen from the page: requests carry the bearer token (when one is
// set), and failures become ApiError with the API's own one-line `detail` message. Paths are
// relative ("api/search"), so the page also works behind a proxy that serves it under a prefix.

const TOKEN_KEY = "whymatch.token";
const REVIEWER_KEY = "whymatch.reviewer";

export const access = {
  get token() {
    return localStorage.getItem(TOKEN_KEY) || "";
  },
  set token(value) {
    if (value) localStorage.setItem(TOKEN_KEY, value);
    else localStorage.removeItem(TOKEN_KEY);
  },
  get reviewer() {
    return localStorage.getItem(REVIEWER_KEY) || "";
  },
  set reviewer(value) {
    if (value) localStorage.setItem(REVIEWER_KEY, value);
    else localStorage.removeItem(REVIEWER_KEY);
  },
};

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// FastAPI's `detail` is a string for our own errors and a list for request validation errors.
function describeDetail(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => {
      const where = Array.isArray(d.loc) ? d.loc.filter((part) => part !== "body").join(".") : "";
      return where ? `${where}: ${d.msg}` : d.msg;
    }).join("; ");
  }
  return "";
}

async function failure(response) {
  let detail = "";
  try {
    detail = describeDetail((await response.json()).detail);
  } catch {
    // not JSON (e.g. a proxy's error page): fall back on the status line
  }
  detail = detail || `${response.status} ${response.statusText}`.trim();
  if (response.status === 401) {
    const hint = access.token ? "the access token was refused" : "an access token is needed";
    return new ApiError(response.status, `${detail} — ${hint}: enter it under “Access” at the top of the page.`);
  }
  return new ApiError(response.status, detail);
}

export async function request(path, { method = "GET", form, json } = {}) {
  const headers = { Accept: "application/json" };
  if (access.token) headers.Authorization = `Bearer ${access.token}`;
  let body;
  if (form) body = form;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body });
  } catch {
    throw new ApiError(0, "Cannot reach the whymatch server. Is `whymatch serve` still running?");
  }
  if (!response.ok) {
    // A missing or refused token: the page opens its Access panel (app.js listens).
    if (response.status === 401) document.dispatchEvent(new CustomEvent("whymatch:need-token"));
    throw await failure(response);
  }
  return response;
}

export async function getJSON(path) {
  return (await request(path)).json();
}

export async function postForm(path, fields) {
  const form = new FormData();
  for (const [name, value] of Object.entries(fields)) {
    if (value === undefined || value === null) continue;
    if (value instanceof Blob) form.append(name, value, value.name || `${name}.jpg`);
    else form.append(name, String(value));
  }
  return (await request(path, { method: "POST", form })).json();
}

export async function postJSON(path, payload) {
  return (await request(path, { method: "POST", json: payload })).json();
}

// Catalogue images are fetched with the token (reads may be protected) and shown from blob URLs.
const imageCache = new Map();

export function imageURL(url) {
  if (!imageCache.has(url)) {
    const loading = request(url)
      .then((response) => response.blob())
      .then((blob) => URL.createObjectURL(blob));
    loading.catch(() => imageCache.delete(url));
    imageCache.set(url, loading);
  }
  return imageCache.get(url);
}
