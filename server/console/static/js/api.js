// HTTP calls to this server: JSON, uploads with progress, server-sent event streams.
// Every call sends the key the user typed (if any) as "Authorization: Bearer <key>". Refusals
// become ApiError carrying the server's message: {"error": str} (loraplex routes) or
// {"error": {"message"}} (the OpenAI routes).

const KEY_ITEM = "loraplex.key";

export function getKey() {
  return sessionStorage.getItem(KEY_ITEM) || "";
}

export function setKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
  window.dispatchEvent(new CustomEvent("loraplex:key"));
}

export class ApiError extends Error {
  constructor(status, message, type, admin = false) {
    super(message);
    this.status = status;
    this.type = type || "";
    this.admin = admin; // the refused call was an admin action (upload, compose, shrink, delete)
  }

  get refused() {
    return this.status === 401 || this.status === 403;
  }

  /** The message shown to the user; refusals say which key the action needs. */
  describe() {
    if (this.refused && this.admin) return `Admin action refused (${this.status}): ${this.message}`;
    if (this.refused) return `Refused (${this.status}): ${this.message}`;
    return this.status ? `${this.status}: ${this.message}` : this.message;
  }
}

function authHeaders(extra = {}) {
  const key = getKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : { ...extra };
}

/** The server's error body as an ApiError (any status, any of its two error shapes). */
function errorFromBody(status, text, admin) {
  let message = text || `HTTP ${status}`;
  let type = "";
  try {
    const body = JSON.parse(text);
    const error = body.error;
    if (typeof error === "string") {
      message = error;
      type = body.error_type || "";
    } else if (error && typeof error === "object") {
      message = error.message || message;
      type = error.code || error.type || "";
    } else if (body.detail) {
      message = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
    }
  } catch {
    // not JSON: keep the text
  }
  const failure = new ApiError(status, message, type, admin);
  if (failure.refused) window.dispatchEvent(new CustomEvent("loraplex:refused", { detail: failure }));
  return failure;
}

/** fetch() a JSON route; resolves to the parsed body (null for 204), `parse(text)` if given. */
/**
 * fetch + error handling. `page: true` (GET /adapters?limit=...): returns { items, next }, where
 * next is the X-Next-Cursor header (null on the last page).
 */
export async function api(path, { method = "GET", json, admin = false, signal, parse, page = false } = {}) {
  const init = { method, headers: authHeaders(), signal };
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `the server cannot be reached (${err.message})`, "network", admin);
  }
  if (!response.ok) throw errorFromBody(response.status, await response.text(), admin);
  if (response.status === 204) return null;
  const body = parse ? parse(await response.text()) : await response.json();
  return page ? { items: body, next: response.headers.get("X-Next-Cursor") } : body;
}

/**
 * POST /adapters with XMLHttpRequest, whose upload events report progress (fetch has none).
 * onProgress(fraction in [0, 1]) is called while the body is sent.
 */
export function uploadAdapter(form, { replace = false, onProgress = () => {} } = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", replace ? "/adapters?replace=true" : "/adapters");
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.onprogress = (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    };
    xhr.upload.onload = () => onProgress(1);
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) resolve(JSON.parse(xhr.responseText));
      else reject(errorFromBody(xhr.status, xhr.responseText, true));
    };
    xhr.onerror = () => reject(new ApiError(0, "the upload failed: the server cannot be reached", "network", true));
    xhr.send(form);
  });
}

/**
 * POST a JSON body to a server-sent events route; yields each event's parsed data until the
 * stream ends (or "[DONE]", the OpenAI routes' last event). An error event is thrown.
 */
export async function* streamEvents(path, body, signal) {
  let response;
  try {
    response = await fetch(path, {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify(body),
      signal,
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, `the server cannot be reached (${err.message})`, "network");
  }
  if (!response.ok) throw errorFromBody(response.status, await response.text(), false);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) throw errorFromBody(0, data, false);
      yield event;
    }
  }
}
