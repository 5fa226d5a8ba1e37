// The console's entry point: hash routing between the views, and the API key dialog.
//   #adapters   #playground   #analysis/<id>   #compare/<a>/<b>   #live

import { getKey, setKey } from "./api.js";
import { $, clearNotice, showError } from "./ui.js";
import { refreshAdapters, state } from "./state.js";
import * as adapters from "./adapters.js";
import * as playground from "./playground.js";
import * as analysis from "./analysis.js";
import * as compare from "./compare.js";
import * as live from "./live.js";

const VIEWS = { adapters, playground, analysis, compare, live };
let current = null;

function parseHash() {
  const [name, ...params] = location.hash.replace(/^#/, "").split("/").map(decodeURIComponent);
  return { name: VIEWS[name] ? name : "adapters", params };
}

function showSection(name) {
  if (current && current !== name) VIEWS[current].hide?.();
  for (const view of Object.keys(VIEWS)) $(`#view-${view}`).hidden = view !== name;
  for (const link of document.querySelectorAll("#nav a")) link.classList.toggle("active", link.dataset.view === name);
  current = name;
}

/** Show the view the hash names; `fresh`: the adapters and /info were just fetched. */
async function route({ fresh = false } = {}) {
  const { name, params } = parseHash();
  showSection(name);
  try {
    await VIEWS[name].show(params, { fresh });
  } catch (err) {
    showError(err);
  }
}

// --------------------------------------------------------------------------- key dialog

// The caller /info names (issue 28): a tenant's key shows its tenant; the admin and API keys say "set".
function showKeyState() {
  const tenant = state.info && state.info.tenant;
  const named = tenant && !tenant.startsWith("_") ? `Key: tenant ${tenant}` : "Key: set";
  $("#key-button").textContent = getKey() ? named : "Key: none";
}

function openKeyDialog(reason) {
  const dialog = $("#key-dialog");
  $("#key-reason").textContent = reason || "Give the key this server was started with (LORAPLEX_API_KEY or LORAPLEX_ADMIN_KEY).";
  $("#key-input").value = "";
  if (!dialog.open) dialog.showModal();
  $("#key-input").focus();
}

function initKeyDialog() {
  const dialog = $("#key-dialog");
  $("#key-button").addEventListener("click", () => openKeyDialog());
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setKey($("#key-input").value.trim());
    dialog.close();
    clearNotice();
    reload();
  });
  $("#key-forget").addEventListener("click", () => {
    setKey("");
    dialog.close();
    reload();
  });
  $("#key-cancel").addEventListener("click", () => dialog.close());
  window.addEventListener("loraplex:key", showKeyState);
  // 401: no key or a wrong one; ask for it. 403 (the API key on an admin action) is shown as a notice.
  window.addEventListener("loraplex:refused", (event) => {
    const err = event.detail;
    if (err.status === 401) {
      openKeyDialog(`${err.admin ? "This admin action was" : "The server"} refused (401): ${err.message}`);
    }
  });
  showKeyState();
}

async function reload() {
  try {
    await refreshAdapters();
    $("#model-name").textContent = state.info ? `${state.info.model} · ${state.info.device} · ${state.info.mode}` : "";
    showKeyState();
  } catch (err) {
    showError(err);
    showSection(parseHash().name); // the page, without data until a key is given
    return;
  }
  await route({ fresh: true });
}

// --------------------------------------------------------------------------- start

function start() {
  initKeyDialog();
  $("#notice-close").addEventListener("click", clearNotice);
  for (const view of Object.values(VIEWS)) view.init();
  window.addEventListener("hashchange", () => route());
  reload();
}

start();
