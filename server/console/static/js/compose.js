// Adapters view, compose card: POST /adapters/compose from stored adapters picked with weights,
// a strategy (density and sign election where they apply), an optional rank and a new id; the
// answer's report (relative error of the recompression per module, the DARE seed) is shown.

import { api } from "./api.js";
import { $, el, formatNumber, notify, renderStats, showError } from "./ui.js";
import { refreshAdapters, state } from "./state.js";

const USES_DENSITY = new Set(["ties", "dare_linear", "dare_ties"]);
const ELECTS_SIGN = new Set(["ties", "dare_ties"]);
const MIN_SOURCES = 2;

/** What the user picked, kept across redraws of the list: id -> {checked, weight}. */
const picked = new Map();

export function init() {
  $("#compose-form").addEventListener("submit", submit);
  $("#compose-strategy").addEventListener("change", showApplicable);
  $("#compose-new-id").addEventListener("input", showReady);
  window.addEventListener("loraplex:adapters", renderSources);
  showApplicable();
}

// --------------------------------------------------------------------------- the form

function renderSources() {
  const ids = new Set(state.adapters.map((a) => a.id));
  for (const id of [...picked.keys()]) if (!ids.has(id)) picked.delete(id);
  const rows = state.adapters.map((a) => {
    const choice = picked.get(a.id) || { checked: false, weight: "1" };
    picked.set(a.id, choice);
    const box = el("input", { type: "checkbox", value: a.id, "aria-label": `Compose ${a.id}` });
    box.checked = choice.checked;
    const weight = el("input", {
      type: "number", step: "any", min: "-100", max: "100", value: choice.weight,
      class: "weight", "aria-label": `Weight of ${a.id}`, disabled: !choice.checked,
    });
    box.addEventListener("change", () => {
      choice.checked = box.checked;
      weight.disabled = !box.checked;
      showReady();
    });
    weight.addEventListener("input", () => (choice.weight = weight.value));
    return el("label", { class: "source", dataset: { id: a.id } }, box, el("span", {}, `${a.id} `),
      el("span", { class: "muted small" }, `r${a.rank}`), "× ", weight);
  });
  $("#compose-sources").replaceChildren(...rows);
  showReady();
}

function chosen() {
  return state.adapters
    .filter((a) => picked.get(a.id)?.checked)
    .map((a) => ({ id: a.id, weight: Number(picked.get(a.id).weight) }));
}

/** Density only for ties / DARE, the sign election only for ties / dare_ties. */
function showApplicable() {
  const strategy = $("#compose-strategy").value;
  $("#compose-density").disabled = !USES_DENSITY.has(strategy);
  $("#compose-sign").disabled = !ELECTS_SIGN.has(strategy);
}

function showReady() {
  const count = chosen().length;
  const named = $("#compose-new-id").value.trim() !== "";
  $("#compose-submit").disabled = count < MIN_SOURCES || !named;
  $("#compose-hint").textContent =
    count < MIN_SOURCES ? `pick ${MIN_SOURCES} or more adapters (${count} picked)` : named ? "" : "give the new id";
}

function body() {
  const strategy = $("#compose-strategy").value;
  const request = { sources: chosen(), strategy, new_id: $("#compose-new-id").value.trim() };
  if (USES_DENSITY.has(strategy)) request.density = Number($("#compose-density").value);
  if (ELECTS_SIGN.has(strategy)) request.majority_sign_method = $("#compose-sign").value;
  const rank = $("#compose-rank").value.trim();
  if (rank) request.rank = Number(rank);
  return request;
}

async function submit(event) {
  event.preventDefault();
  const request = body();
  const button = $("#compose-submit");
  button.disabled = true;
  $("#compose-status").textContent = "composing…";
  try {
    const result = await api("/adapters/compose", { method: "POST", json: request, admin: true, parse: keepSeed });
    $("#compose-status").textContent = "";
    renderReport(result);
    notify(`Composed ${result.id}: rank ${result.rank} from ${describeSources(result.compose.sources)}`, { error: false });
    $("#compose-new-id").value = "";
    await refreshAdapters();
  } catch (err) {
    $("#compose-status").textContent = "refused";
    showError(err);
  } finally {
    showReady();
  }
}

// --------------------------------------------------------------------------- the report

/** The answer with the DARE seed exact: it has 63 bits and a JS number 53, so it is kept as its digits. */
function keepSeed(text) {
  const result = JSON.parse(text);
  const digits = text.match(/"seed"\s*:\s*(\d+)/);
  if (digits) result.compose.seed = digits[1];
  return result;
}

function describeSources(sources) {
  return sources.map((s) => `${s.id} × ${s.weight}`).join(" + ");
}

/** The new adapter's compose report: errors of the recompression (when a rank was given), the seed. */
function renderReport(result) {
  const report = result.compose;
  const recompressed = report.rank !== null && report.rank !== undefined;
  const dare = report.strategy.startsWith("dare");
  $("#compose-result").hidden = false;
  $("#compose-result-title").textContent = `${result.id}: ${describeSources(report.sources)}`;
  renderStats($("#compose-stats"), [
    ["strategy", report.strategy, "strategy"],
    ["stored rank", result.rank, "rank"],
    ["max relative error per module", recompressed ? formatNumber(report.max_relative_error) : "0 (exact)", "max_relative_error"],
    ["relative error of the whole update", recompressed ? formatNumber(report.relative_error) : "0 (exact)", "relative_error"],
    ["DARE seed", dare ? String(report.seed) : "– (no random masks)", "seed", dare],
  ]);
  const layers = [...report.layers].sort((a, b) => b.relative_error - a.relative_error);
  $("#compose-layers tbody").replaceChildren(
    ...layers.map((layer) =>
      el("tr", {},
        el("td", {}, layer.module),
        el("td", {}, layer.rank),
        el("td", {}, layer.stored_rank),
        el("td", {}, formatNumber(layer.relative_error)))),
  );
  $("#compose-layers-count").textContent = `${layers.length} modules, worst first`;
}
