// Adapters view: the table of stored adapters (GET /adapters in pages of PAGE, filtered by id
// prefix, "Show more" follows the cursor; GET /info for what is resident or merged now), upload (drag-and-drop or file input, XHR progress), shrink and delete; the
// compose card is compose.js.

import { api, uploadAdapter } from "./api.js";
import * as compose from "./compose.js";
import { $, el, formatBytes, notify, showError } from "./ui.js";
import { refreshAdapters, state } from "./state.js";

const ARCHIVE = /\.(zip|tar|tar\.gz|tgz)$/i;
const PAGE = 50;
let staged = [];
const table = { prefix: "", rows: [], next: null }; // the pages shown, and the cursor of the next one
let filterTimer = null;

export function init() {
  const zone = $("#drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    stage([...event.dataTransfer.files]);
  });
  $("#file-input").addEventListener("change", (event) => stage([...event.target.files]));
  $("#upload-button").addEventListener("click", upload);
  $("#adapters-refresh").addEventListener("click", () => refreshAdapters().catch(showError));
  $("#shrink-form").addEventListener("submit", submitShrink);
  $("#shrink-cancel").addEventListener("click", () => $("#shrink-dialog").close());
  $("#adapters-more").addEventListener("click", () => loadTable({ more: true }).catch(showError));
  $("#adapters-filter").addEventListener("input", (event) => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(() => {
      table.prefix = event.target.value.trim();
      loadTable().catch(showError);
    }, 200);
  });
  // after an upload, delete or refresh: reload as many rows as are shown (the state is the server's)
  window.addEventListener("loraplex:adapters", () => loadTable({ keep: true }).catch(showError));
  compose.init();
}

export async function show(_params, { fresh = false } = {}) {
  if (!fresh) await refreshAdapters();
}

// --------------------------------------------------------------------------- upload

/** Two files (config + weights) go as field "files"; a single archive as field "archive". */
function stage(files) {
  staged = files;
  const names = files.map((f) => `${f.name} (${formatBytes(f.size)})`).join(", ");
  $("#staged").textContent = files.length ? names : "No files chosen.";
  $("#upload-button").disabled = files.length === 0;
  if (!$("#upload-id").value && files.length) $("#upload-id").placeholder = suggestedId(files);
}

function suggestedId(files) {
  if (files.length === 1 && ARCHIVE.test(files[0].name)) return files[0].name.replace(ARCHIVE, "");
  return "from the file names";
}

async function upload() {
  if (!staged.length) return;
  const form = new FormData();
  const id = $("#upload-id").value.trim();
  if (id) form.append("adapter_id", id);
  const isArchive = staged.length === 1 && ARCHIVE.test(staged[0].name);
  for (const file of staged) form.append(isArchive ? "archive" : "files", file, file.name);
  const progress = $("#upload-progress");
  const status = $("#upload-status");
  progress.hidden = false;
  progress.value = 0;
  status.textContent = "uploading…";
  $("#upload-button").disabled = true;
  try {
    const summary = await uploadAdapter(form, {
      replace: $("#upload-replace").checked,
      onProgress: (fraction) => {
        progress.value = Math.round(fraction * 100);
        status.textContent = fraction < 1 ? `${Math.round(fraction * 100)}%` : "validating against the base model…";
      },
    });
    status.textContent = `stored ${summary.id} (rank ${summary.rank}, ${summary.layers} layers)`;
    notify(`Uploaded ${summary.id}`, { error: false });
    staged = [];
    $("#file-input").value = "";
    $("#upload-id").value = "";
    $("#staged").textContent = "No files chosen.";
    await refreshAdapters();
  } catch (err) {
    status.textContent = "refused";
    showError(err);
    $("#upload-button").disabled = false;
  }
}

// --------------------------------------------------------------------------- table

function stateBadge(id) {
  const info = state.info || {};
  if (info.merged_adapter === id) return el("span", { class: "badge merged", title: "folded into the base weights" }, "merged");
  if ((info.adapters_loaded || []).includes(id)) return el("span", { class: "badge resident", title: "in a memory slot" }, "resident");
  return el("span", { class: "badge", title: "on disk only" }, "stored");
}

/** One page of GET /adapters (the first, or the next after the cursor), with the id-prefix filter. */
async function loadTable({ more = false, keep = false } = {}) {
  const limit = keep ? Math.min(1000, Math.max(PAGE, table.rows.length)) : PAGE;
  const query = new URLSearchParams({ limit: String(limit) });
  if (table.prefix) query.set("prefix", table.prefix);
  if (more && table.next) query.set("cursor", table.next);
  const prefix = table.prefix;
  const page = await api(`/adapters?${query}`, { page: true });
  if (prefix !== table.prefix) return; // the filter changed meanwhile: a newer load draws the table
  table.rows = more ? [...table.rows, ...page.items] : page.items;
  table.next = page.next;
  renderTable();
}

function renderTable() {
  const body = $("#adapters-table tbody");
  const rows = table.rows.map((a) =>
    el("tr", { dataset: { id: a.id } },
      el("td", {}, el("a", { href: `#analysis/${encodeURIComponent(a.id)}`, title: "analyse" }, a.id)),
      el("td", {}, a.rank),
      el("td", {}, a.target_modules.join(", ")),
      el("td", { title: `${a.parameters.toLocaleString("en")} parameters` }, formatBytes(a.bytes)),
      el("td", { title: a.created_at }, new Date(a.created_at).toLocaleString()),
      el("td", { class: "state" }, stateBadge(a.id)),
      el("td", { class: "actions" },
        el("a", { href: `#analysis/${encodeURIComponent(a.id)}` }, "analyse"),
        el("button", { type: "button", class: "quiet", onclick: () => openShrink(a) }, "Shrink"),
        deleteButton(a.id)),
    ),
  );
  body.replaceChildren(...rows);
  const empty = $("#adapters-empty");
  empty.hidden = rows.length > 0;
  empty.textContent = table.prefix
    ? `No adapter id starts with "${table.prefix}".`
    : "No adapters stored yet: upload one above.";
  $("#adapters-more").hidden = !table.next;
}

/** Delete asks once more in place: the first click arms the button for 4 s. */
function deleteButton(id) {
  const button = el("button", { type: "button", class: "danger", "aria-label": `Delete ${id}` }, "Delete");
  let timer = null;
  button.addEventListener("click", async () => {
    if (!button.classList.contains("armed")) {
      button.classList.add("armed");
      button.textContent = "Confirm delete";
      timer = setTimeout(() => {
        button.classList.remove("armed");
        button.textContent = "Delete";
      }, 4000);
      return;
    }
    clearTimeout(timer);
    button.disabled = true;
    try {
      await api(`/adapters/${encodeURIComponent(id)}`, { method: "DELETE", admin: true });
      notify(`Deleted ${id}`, { error: false });
      await refreshAdapters();
    } catch (err) {
      showError(err);
      button.disabled = false;
      button.classList.remove("armed");
      button.textContent = "Delete";
    }
  });
  return button;
}

// --------------------------------------------------------------------------- shrink

function openShrink(adapter) {
  $("#shrink-source").textContent = adapter.id;
  $("#shrink-form").dataset.source = adapter.id;
  $("#shrink-new-id").value = `${adapter.id}-small`;
  $("#shrink-dialog").showModal();
}

async function submitShrink(event) {
  event.preventDefault();
  const source = event.target.dataset.source;
  const body = {
    method: $("#shrink-method").value,
    value: Number($("#shrink-value").value),
    new_id: $("#shrink-new-id").value.trim(),
  };
  $("#shrink-submit").disabled = true;
  try {
    const result = await api(`/adapters/${encodeURIComponent(source)}/shrink`, { method: "POST", json: body, admin: true });
    $("#shrink-dialog").close();
    const kept = (result.shrink.fro_retained * 100).toFixed(1);
    notify(`Stored ${result.id}: rank ${result.rank} (was ${result.shrink.original_rank}), ${kept}% of ‖ΔW‖_F kept`, { error: false });
    await refreshAdapters();
  } catch (err) {
    $("#shrink-dialog").close();
    showError(err);
  } finally {
    $("#shrink-submit").disabled = false;
  }
}
