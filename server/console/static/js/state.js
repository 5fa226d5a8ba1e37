// What several views share: the stored adapters (GET /adapters) and the server's state (GET /info).
// Views listen for "loraplex:adapters" to redraw their adapter lists.

import { api } from "./api.js";

export const state = { adapters: [], info: null };

export async function refreshAdapters() {
  const [adapters, info] = await Promise.all([api("/adapters"), api("/info")]);
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
