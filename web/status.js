// One status line per view (an aria-live region): loading with a spinner, done, empty or error.

export function setStatus(node, kind, message) {
  node.dataset.kind = kind;
  if (kind !== "loading") {
    node.textContent = message;
    return;
  }
  const spinner = document.createElement("span");
  spinner.className = "spinner";
  spinner.setAttribute("aria-hidden", "true");
  const text = document.createElement("span");
  text.textContent = message;
  node.replaceChildren(spinner, text);
}
