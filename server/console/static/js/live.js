// Live view: GET /info every second while the view is open: running and waiting requests, the
// batch, tokens per second (the difference of info.generated_tokens between polls), the merged
// adapter and swaps, adapters resident in memory slots, KV memory; the last 2 minutes charted.

import { api } from "./api.js";
import { $, el, formatNumber, renderStats, showError } from "./ui.js";
import { color, draw } from "./charts.js";

const PERIOD_MS = 1000;
const WINDOW_S = 120;
let timer = null;
let last = null; // {t, tokens} of the previous poll
let origin = null;
let tpsChart = null;
let rowsChart = null;

export function init() {}

export async function show() {
  if (timer) return;
  origin = performance.now();
  last = null;
  tpsChart = draw($("#live-tps"), lineConfig([["tokens/s", 0]]));
  rowsChart = draw($("#live-rows"), lineConfig([["running", 1], ["waiting", 2]]));
  timer = -1; // polling (set before the first poll, which may stop it)
  await poll();
  if (timer === null) return;
  timer = setInterval(poll, PERIOD_MS);
}

export function hide() {
  clearInterval(timer);
  timer = null;
}

function lineConfig(series) {
  return {
    type: "line",
    data: {
      datasets: series.map(([label, c]) => ({
        label,
        data: [],
        borderColor: color(c),
        backgroundColor: color(c, 0.15),
        fill: true,
        pointRadius: 0,
        borderWidth: 1.5,
        stepped: label !== "tokens/s",
      })),
    },
    options: {
      aspectRatio: 2.4,
      interaction: { mode: "index", intersect: false },
      scales: {
        x: { type: "linear", title: { display: true, text: "seconds" }, ticks: { precision: 0 } },
        y: { min: 0, suggestedMax: 4, ticks: { precision: 0 } },
      },
    },
  };
}

async function poll() {
  let info;
  try {
    info = await api("/info");
  } catch (err) {
    hide(); // a refusal or a server gone: stop polling, say why
    showError(err);
    return;
  }
  const now = performance.now();
  const tps = last === null ? 0 : (info.generated_tokens - last.tokens) / ((now - last.t) / 1000);
  last = { t: now, tokens: info.generated_tokens };
  const limits = info.limits || {};
  const kv = info.kv_cache || {};
  renderStats($("#live-stats"), [
    ["mode", info.mode, "mode"],
    ["running requests", info.running_requests, "running"],
    ["waiting requests", info.waiting_requests, "waiting"],
    ["batch size / max", `${info.running_requests} / ${limits.max_batch}`, "batch"],
    ["tokens/s", formatNumber(Math.max(tps, 0), 3), "tps"],
    ["tokens since start", info.generated_tokens, "generated"],
    ["merged adapter", info.merged_adapter ?? "none", "merged"],
    ["swaps", info.swaps, "swaps"],
    ["KV memory used", kv.capacity_tokens ? `${kv.used_tokens} / ${kv.capacity_tokens} tokens` : `${kv.used_tokens} tokens`, "kv"],
    ["HTTP requests in flight", info.http_requests_in_flight ?? "–", "in_flight"],
  ]);
  const resident = info.adapters_loaded || [];
  $("#live-resident").replaceChildren(
    ...(resident.length
      ? resident.map((id) => el("span", { class: `badge ${id === info.merged_adapter ? "merged" : "resident"}` }, id))
      : [el("span", { class: "muted" }, `none (${limits.max_loaded_adapters} slots)`)]),
  );
  const x = (now - origin) / 1000;
  push(tpsChart, [Math.max(tps, 0)], x);
  push(rowsChart, [info.running_requests, info.waiting_requests], x);
}

function push(chart, values, x) {
  chart.data.datasets.forEach((dataset, i) => {
    dataset.data.push({ x, y: values[i] });
    while (dataset.data.length && dataset.data[0].x < x - WINDOW_S) dataset.data.shift();
  });
  chart.update("none");
}
