// What several views share: the stored adapters (GET /adapters) and the server's state (GET /info).
// Views listen for "loraplex:adapters" to redraw their adapter lists.

import { api } from "./api.js";

export const state = { adapters: [], info: null };

/** Every stored adapter, in pages of 1,000 (GET /adapters?limit=&cursor=): bounded answers at any count. */
async function allAdapters() {
  const adapters = [];
  let cursor = null;
  do {
    const query = new URLSearchParams({ limit: "1000" });
    if (cursor) query.set("cursor", cursor);
    const page = await api(`/adapters?${query}`, { page: true });
    adapters.push(...page.items);
    cursor = page.next;
  } while (cursor);
  return adapters;
}

export async function refreshAdapters() {
  const [adapters, info] = await Promise.all([allAdapters(), api("/info")]);
  state.adapters = adapters;
  state.info = info;
  window.dispatchEvent(new CustomEvent("loraplex:adapters"));
  return adapters;
}

export async function refreshInfo() {
  state.info = await api("/info");
  return state.info;
}

export const adapterIds = () => state.adapters.map((a) => a.id);
