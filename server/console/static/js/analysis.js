// Analysis view: interactive charts of GET /adapters/{id}/analysis (docs/analysis.md): the
// singular values of ΔW per layer, σ₁(ΔW)/σ_max(W) and the effective rank by layer and module,
// ‖ΔW‖_F by layer. Hovering a point shows its module and value.

import { api, getKey } from "./api.js";
import { $, fillSelect, formatNumber, renderStats, showError } from "./ui.js";
import { adapterIds } from "./state.js";
import { byLayerDatasets, color, draw, groupByKind, moduleTitle } from "./charts.js";

let request = 0; // only the latest answer is drawn

export function init() {
  $("#an-load").addEventListener("click", () => {
    const id = $("#an-adapter").value;
    if (!id) return;
    const hash = `#analysis/${encodeURIComponent(id)}`;
    if (location.hash === hash) load(id).catch(showError);
    else location.hash = hash;
  });
  window.addEventListener("loraplex:adapters", () => fillSelect($("#an-adapter"), adapterIds()));
}

export async function show([id] = []) {
  fillSelect($("#an-adapter"), adapterIds(), id);
  const chosen = id || $("#an-adapter").value;
  if (!chosen) {
    $("#an-status").textContent = "No adapters stored yet.";
    return;
  }
  await load(chosen);
}

async function load(id) {
  const mine = ++request;
  const layers = $("#an-layers").value.trim();
  const query = layers ? `?layers=${encodeURIComponent(layers)}` : "";
  $("#an-status").textContent = `analysing ${id}… (the first analysis on a base model computes its σ_max(W) once)`;
  const started = performance.now();
  let result;
  try {
    result = await api(`/adapters/${encodeURIComponent(id)}/analysis${query}`);
  } catch (err) {
    if (mine === request) $("#an-status").textContent = "";
    throw err;
  }
  if (mine !== request) return;
  const seconds = ((performance.now() - started) / 1000).toFixed(2);
  $("#an-status").textContent = `${result.layers.length} layers, answered in ${seconds} s`;
  const link = $("#an-html");
  link.href = `/adapters/${encodeURIComponent(id)}/analysis.html${query}`;
  link.hidden = Boolean(getKey()); // a plain link cannot send the key as a header
  renderSummary(result);
  drawCharts(result);
}

function renderSummary(result) {
  const s = result.summary;
  const recommended = Object.entries(s.recommended_rank || {})
    .map(([method, rank]) => `${method}: ${formatNumber(rank)}`)
    .join(" · ");
  renderStats($("#an-summary"), [
    ["adapter", result.adapter_id, "adapter"],
    ["rank / alpha", `${result.rank} / ${formatNumber(result.lora_alpha)}`, "rank"],
    ["layers", s.layers, "layers"],
    ["mean effective rank", formatNumber(s.mean_effective_rank), "effective_rank"],
    ["median amplification", formatNumber(s.median_amplification_factor), "amplification"],
    ["max σᵢ / σ_max(W)", formatNumber(s.max_sval_ratio), "max_ratio"],
    ["total ‖ΔW‖_F", formatNumber(s.total_delta_fro), "fro"],
    ...(recommended ? [["rank that meets each method in every layer", recommended, "recommended", true]] : []),
  ]);
}

function drawCharts(result) {
  const rows = result.layers;
  const groups = groupByKind(rows);
  const kinds = [...groups.keys()];
  const layerAxis = { type: "linear", title: { display: true, text: "layer" }, ticks: { precision: 0 } };
  const tooltip = (format) => ({ callbacks: { title: moduleTitle, label: (item) => format(item) } });

  // Spectra: one line per layer, coloured by module kind; the legend names the kinds once.
  const spectra = rows.map((row) => {
    const k = kinds.indexOf(groupByKind([row]).keys().next().value);
    return {
      label: kinds[k],
      data: row.singular_values.map((s, i) => ({ x: i + 1, y: Math.max(s, 1e-12), module: row.module })),
      borderColor: color(k, 0.55),
      backgroundColor: color(k, 0.55),
      borderWidth: 1,
      pointRadius: 1.5,
    };
  });
  const firstOfKind = new Set(kinds.map((kind) => spectra.findIndex((d) => d.label === kind)));
  draw($("#an-spectra"), {
    type: "line",
    data: { datasets: spectra },
    options: {
      interaction: { mode: "nearest", intersect: false },
      scales: {
        x: { type: "linear", title: { display: true, text: "component i" }, ticks: { precision: 0 } },
        y: { type: "logarithmic", title: { display: true, text: "σᵢ(ΔW)" } },
      },
      plugins: {
        legend: { labels: { filter: (item) => firstOfKind.has(item.datasetIndex) } },
        tooltip: tooltip((item) => `σ${item.raw.x} = ${formatNumber(item.raw.y, 4)}`),
      },
    },
  });

  const byLayer = (canvas, value, yTitle, label, yOptions = {}) =>
    draw(canvas, {
      type: "line",
      data: { datasets: byLayerDatasets(groups, value) },
      options: {
        interaction: { mode: "nearest", intersect: false },
        scales: { x: layerAxis, y: { title: { display: true, text: yTitle }, ...yOptions } },
        plugins: { tooltip: tooltip((item) => `${label} = ${formatNumber(item.raw.y, 4)}`) },
      },
    });
  byLayer($("#an-ratio"), (row) => row.sval_ratios[0], "σ₁(ΔW) / σ_max(W)", "σ₁/σ_max(W)");
  byLayer($("#an-effrank"), (row) => row.effective_rank, "effective rank", "effective rank", {
    min: 0,
    suggestedMax: result.rank,
  });
  byLayer($("#an-fro"), (row) => row.delta_fro, "‖ΔW‖_F", "‖ΔW‖_F", { min: 0 });
}
