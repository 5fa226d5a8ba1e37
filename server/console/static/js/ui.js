// Small DOM helpers shared by the views.

export const $ = (selector, root = document) => root.querySelector(selector);

/** el("td", {class: "x", onclick: f}, child, "text", ...): an element with attributes and children. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

/** The notice bar under the header: errors stay until dismissed, information fades. */
let noticeTimer = null;
export function notify(message, { error = true } = {}) {
  const box = $("#notice");
  $("#notice-text").textContent = message;
  box.classList.toggle("info", !error);
  box.hidden = false;
  clearTimeout(noticeTimer);
  if (!error) noticeTimer = setTimeout(() => (box.hidden = true), 4000);
}

export function showError(err) {
  if (err && err.name === "AbortError") return;
  notify(err && err.describe ? err.describe() : String(err && err.message ? err.message : err));
}

export function clearNotice() {
  $("#notice").hidden = true;
}

export function formatBytes(n) {
  if (n == null) return "";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return `${n.toFixed(i === 0 ? 0 : n < 10 ? 2 : 1)} ${units[i]}`;
}

export function formatNumber(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (Number.isInteger(x)) return x.toLocaleString("en");
  const abs = Math.abs(x);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e5)) return x.toExponential(2);
  return x.toPrecision(digits);
}

/** A row of label/value cards into `container`: [label, value, data-stat id, wide?] each. */
export function renderStats(container, stats) {
  container.replaceChildren(
    ...stats.map(([label, value, id, wide]) =>
      el("div", { class: wide ? "stat wide" : "stat", dataset: id ? { stat: id } : undefined },
        el("div", { class: "label" }, label),
        el("div", { class: "value" }, value)),
    ),
  );
}

/** Fill a <select> with `values`, keeping the current choice when it is still offered. */
export function fillSelect(select, values, preferred) {
  const keep = preferred ?? select.value;
  select.replaceChildren(...values.map((v) => el("option", { value: v }, v)));
  if (values.includes(keep)) select.value = keep;
}
