// Analysis view: interactive charts of GET /adapters/{id}/analysis (docs/analysis.md): the
// singular values of ΔW per layer, σ₁(ΔW)/σ_max(W) and the effective rank by layer and module,
// ‖ΔW‖_F by layer. Hovering a point shows its module and value. The "Screening and behaviour"
// card shows the adapter's coverage and warnings (GET /adapters/{id}) and, on "Probe", the
// behavioural probe (GET /adapters/{id}/probe: KL(adapter ‖ base), top-1 agreement; docs/adapters.md).

import { api, getKey } from "./api.js";
import { $, el, fillSelect, formatNumber, renderStats, showError } from "./ui.js";
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
  $("#an-probe").addEventListener("click", () => probe($("#an-adapter").value).catch(showError));
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
  screening(id).catch(showError);
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

// --------------------------------------------------------------------------- screening and probe

async function screening(id) {
  $("#an-probe-stats").replaceChildren();
  $("#an-probe-status").textContent = "";
  const summary = await api(`/adapters/${encodeURIComponent(id)}`);
  if (id !== $("#an-adapter").value) return;
  const cov = summary.coverage;
  const types = Object.entries(cov.module_types).map(([t, n]) => `${t} ×${n}`).join(", ");
  $("#an-coverage").textContent = `Adapts ${cov.modules} of the base's ${cov.of} adaptable modules (${types}).`;
  const items = summary.warnings.map((w) => el("li", { class: "warning", dataset: { type: w.type } }, w.message));
  $("#an-warnings").replaceChildren(...(items.length ? items : [el("li", { class: "muted" }, "No warnings.")]));
}

async function probe(id) {
  if (!id) return;
  const button = $("#an-probe");
  button.disabled = true;
  $("#an-probe-status").textContent = `probing ${id}… (the base and the adapter read a few prompts)`;
  try {
    const result = await api(`/adapters/${encodeURIComponent(id)}/probe`);
    if (id !== $("#an-adapter").value) return;
    $("#an-probe-status").textContent = result.cached ? "cached for this version" : "computed now";
    renderStats($("#an-probe-stats"), [
      ["mean KL(adapter ‖ base), nats/token", formatNumber(result.mean_kl, 4), "probe_kl"],
      ["top-1 agreement with the base", `${(result.top1_agreement * 100).toFixed(1)}%`, "probe_agreement"],
      ["tokens", result.tokens, "probe_tokens"],
    ]);
  } catch (err) {
    $("#an-probe-status").textContent = "";
    throw err;
  } finally {
    button.disabled = false;
  }
}
