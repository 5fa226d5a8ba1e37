// Compare view: subspace similarity of two adapters (GET /adapters/compare?a=&b=, LoRA paper
// Eq. 4): a heat map of φ(i, j) for one module or the mean over the modules both adapt, and
// φ of the top direction and of the whole subspace by layer.

import { api } from "./api.js";
import { $, el, fillSelect, formatNumber, renderStats, showError } from "./ui.js";
import { adapterIds } from "./state.js";
import { color, draw, drawHeatmap, groupByKind, moduleTitle } from "./charts.js";

const MEAN = "__mean__";
let result = null;
let request = 0;

export function init() {
  $("#cmp-load").addEventListener("click", () => {
    const a = $("#cmp-a").value;
    const b = $("#cmp-b").value;
    if (!a || !b) return;
    const hash = `#compare/${encodeURIComponent(a)}/${encodeURIComponent(b)}`;
    if (location.hash === hash) load(a, b).catch(showError);
    else location.hash = hash;
  });
  $("#cmp-module").addEventListener("change", drawCharts);
  $("#cmp-side").addEventListener("change", drawCharts);
  window.addEventListener("loraplex:adapters", fillChoices);
}

function fillChoices(a, b) {
  const ids = adapterIds();
  fillSelect($("#cmp-a"), ids, typeof a === "string" ? a : undefined);
  fillSelect($("#cmp-b"), ids, typeof b === "string" ? b : ids.find((id) => id !== $("#cmp-a").value));
}

export async function show([a, b] = []) {
  fillChoices(a, b);
  if (a && b) await load(a, b);
  else if (!result) $("#cmp-status").textContent = "Choose two adapters.";
}

async function load(a, b) {
  const mine = ++request;
  $("#cmp-status").textContent = `comparing ${a} and ${b}…`;
  let answer;
  try {
    answer = await api(`/adapters/compare?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`);
  } catch (err) {
    if (mine === request) $("#cmp-status").textContent = "";
    throw err;
  }
  if (mine !== request) return;
  result = answer;
  const s = result.summary;
  $("#cmp-status").textContent = `${s.shared_modules} modules adapted by both`;
  renderStats($("#cmp-summary"), [
    ["shared modules", s.shared_modules, "shared"],
    [`only in ${result.a} / ${result.b}`, `${s.only_in_a} / ${s.only_in_b}`, "only"],
    ["mean φ top, left", formatNumber(s.mean_phi_left_top), "phi_left_top"],
    ["mean φ full, left", formatNumber(s.mean_phi_left_full), "phi_left_full"],
    ["mean φ full, right", formatNumber(s.mean_phi_right_full), "phi_right_full"],
    ["random subspaces (left)", formatNumber(s.mean_random_phi_left), "random_left"],
  ]);
  const modules = result.layers.map((row) => row.module);
  const select = $("#cmp-module");
  const keep = select.value;
  select.replaceChildren(
    el("option", { value: MEAN }, `mean over ${modules.length} modules`),
    ...modules.map((m) => el("option", { value: m }, m)),
  );
  select.value = modules.includes(keep) ? keep : MEAN;
  drawCharts();
}

/** Element-wise mean of the modules' φ matrices, over the size every one of them has. */
function meanMatrix(matrices) {
  const n = Math.min(...matrices.map((m) => m.length));
  return Array.from({ length: n }, (_, i) =>
    Array.from({ length: n }, (_, j) => matrices.reduce((sum, m) => sum + m[i][j], 0) / matrices.length),
  );
}

function drawCharts() {
  if (!result || !result.layers.length) return;
  const side = $("#cmp-side").value;
  const field = side === "left" ? "phi_left" : "phi_right";
  const module = $("#cmp-module").value;
  const matrix =
    module === MEAN ? meanMatrix(result.layers.map((row) => row[field])) : result.layers.find((r) => r.module === module)[field];
  const max = drawHeatmap($("#cmp-heatmap"), matrix);
  $("#cmp-scale").textContent = `Colours: 0 (lightest) to ${formatNumber(max)} (darkest), the largest φ shown.`;

  const groups = groupByKind(result.layers);
  const datasets = [];
  [...groups.entries()].forEach(([kind, items], k) => {
    for (const [suffix, dash] of [["top", []], ["full", [6, 4]]]) {
      datasets.push({
        label: `${kind} φ ${suffix}`,
        data: items.map(({ row, layer }) => ({ x: layer, y: row[`${field}_${suffix}`], module: row.module })),
        borderColor: color(k),
        backgroundColor: color(k, 0.2),
        borderDash: dash,
        borderWidth: 1.5,
        pointRadius: 2,
      });
    }
  });
  draw($("#cmp-layers"), {
    type: "line",
    data: { datasets },
    options: {
      interaction: { mode: "nearest", intersect: false },
      scales: {
        x: { type: "linear", title: { display: true, text: "layer" }, ticks: { precision: 0 } },
        y: { min: 0, max: 1, title: { display: true, text: `φ (${side} singular vectors)` } },
      },
      plugins: {
        tooltip: { callbacks: { title: moduleTitle, label: (item) => `${item.dataset.label} = ${formatNumber(item.raw.y)}` } },
      },
    },
  });
}
