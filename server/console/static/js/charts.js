// Chart.js helpers (window.Chart, vendored in ../vendor): one chart per canvas, colours per
// module, layer indices from module names, and a heat map drawn by a small plugin.

const PALETTE = ["#3559d1", "#e4572e", "#17a398", "#f3a712", "#8e44ad", "#c0392b", "#2e86de", "#6ab04c", "#7f8c8d"];

export function color(i, alpha = 1) {
  const hex = PALETTE[i % PALETTE.length];
  if (alpha === 1) return hex;
  const n = parseInt(hex.slice(1), 16);
  return `rgba(${n >> 16}, ${(n >> 8) & 255}, ${n & 255}, ${alpha})`;
}

/** "model.layers.12.self_attn.q_proj" -> {layer: 12, kind: "q_proj"} (layer null when none). */
export function parseModule(name) {
  const match = name.match(/\.(\d+)\./);
  return { layer: match ? Number(match[1]) : null, kind: name.split(".").pop() };
}

/** Rows grouped by module kind (q_proj, v_proj, ...), kinds in first-seen order. */
export function groupByKind(rows, nameOf = (row) => row.module) {
  const groups = new Map();
  rows.forEach((row, index) => {
    const { layer, kind } = parseModule(nameOf(row));
    if (!groups.has(kind)) groups.set(kind, []);
    groups.get(kind).push({ row, layer: layer ?? index });
  });
  return groups;
}

/** Draw `config` on `canvas`, replacing the chart it held. */
export function draw(canvas, config) {
  Chart.getChart(canvas)?.destroy();
  const options = config.options || {};
  config.options = {
    animation: false,
    maintainAspectRatio: true,
    aspectRatio: 1.7,
    ...options,
    plugins: { ...(options.plugins || {}) },
  };
  return new Chart(canvas, config);
}

/** One dataset per module kind: y = value(row) against the layer index. */
export function byLayerDatasets(groups, value, { type = "line" } = {}) {
  return [...groups.entries()].map(([kind, items], i) => ({
    type,
    label: kind,
    data: items.map(({ row, layer }) => ({ x: layer, y: value(row), module: row.module })),
    borderColor: color(i),
    backgroundColor: color(i, type === "bar" ? 0.7 : 0.2),
    pointRadius: 2,
    borderWidth: type === "bar" ? 0 : 1.5,
  }));
}

/** Tooltip title: the full module name of the point under the pointer. */
export const moduleTitle = (items) => (items.length ? items[0].raw.module || "" : "");

// --------------------------------------------------------------------------- heat map

// Sequential palette (ColorBrewer YlGnBu), light (low) to dark (high).
const HEAT_STOPS = [[255, 255, 217], [199, 233, 180], [65, 182, 196], [34, 94, 168], [8, 29, 88]];

/** Colour of t in [0, 1] on the heat palette. */
export function heatColor(t) {
  const x = Math.max(0, Math.min(1, t ?? 0)) * (HEAT_STOPS.length - 1);
  const k = Math.min(Math.floor(x), HEAT_STOPS.length - 2);
  const f = x - k;
  const [r, g, b] = HEAT_STOPS[k].map((c, i) => Math.round(c + (HEAT_STOPS[k + 1][i] - c) * f));
  return `rgb(${r}, ${g}, ${b})`;
}

/** Fills a cell around every point {x: j, y: i, v} of the chart's first dataset. */
const heatmapCells = {
  id: "heatmapCells",
  beforeDatasetsDraw(chart, _args, options) {
    const { ctx, scales } = chart;
    const points = chart.data.datasets[0]?.data || [];
    const top = options.max || 1;
    const w = Math.abs(scales.x.getPixelForValue(1) - scales.x.getPixelForValue(0));
    const h = Math.abs(scales.y.getPixelForValue(1) - scales.y.getPixelForValue(0));
    ctx.save();
    for (const p of points) {
      ctx.fillStyle = heatColor(p.v / top);
      ctx.fillRect(scales.x.getPixelForValue(p.x) - w / 2, scales.y.getPixelForValue(p.y) - h / 2, w, h);
    }
    ctx.restore();
  },
};

/**
 * Heat map of matrix[i][j] (i: rows, top to bottom; j: columns); hover shows the value. The
 * colours span 0 (lightest) to the matrix's largest value (darkest), which is returned.
 */
export function drawHeatmap(canvas, matrix, { rowLabel = "i", colLabel = "j", valueLabel = "φ" } = {}) {
  const n = matrix.length;
  const m = n ? matrix[0].length : 0;
  const data = [];
  matrix.forEach((row, i) => row.forEach((v, j) => data.push({ x: j + 1, y: i + 1, v })));
  const max = Math.max(1e-12, ...data.map((p) => p.v));
  const axis = (title, count, reverse) => ({
    type: "linear",
    min: 0.5,
    max: count + 0.5,
    reverse,
    grid: { display: false },
    afterBuildTicks: (scale) => {
      scale.ticks = Array.from({ length: count }, (_, k) => ({ value: k + 1 }));
    },
    title: { display: true, text: title },
  });
  draw(canvas, {
    type: "scatter",
    data: { datasets: [{ label: valueLabel, data, pointRadius: 0, pointHitRadius: 12, pointHoverRadius: 0 }] },
    plugins: [heatmapCells],
    options: {
      aspectRatio: 1.25,
      scales: { x: axis(`top-${colLabel} directions of B`, m, false), y: axis(`top-${rowLabel} directions of A`, n, true) },
      plugins: {
        heatmapCells: { max },
        legend: { display: false },
        tooltip: {
          callbacks: {
            title: () => "",
            label: (item) => `${valueLabel}(${rowLabel}=${item.raw.y}, ${colLabel}=${item.raw.x}) = ${item.raw.v.toFixed(3)}`,
          },
        },
      },
    },
  });
  return max;
}
