// Playground: one prompt answered by several adapters (and the base model) side by side, all
// streamed at once, so the server decodes them in one mixed batch. With the chat template the
// requests go to /v1/chat/completions (model = adapter id or the base model's name); without it
// the prompt is sent as is to /generate_stream (parameters.adapter_id).

import { api, getKey, streamEvents } from "./api.js";
import { $, el, showError } from "./ui.js";
import { state } from "./state.js";

let running = null; // AbortController of the current run

export function init() {
  $("#pg-run").addEventListener("click", run);
  $("#pg-stop").addEventListener("click", () => running?.abort());
  $("#view-playground").addEventListener("input", renderRequests);
  $("#view-playground").addEventListener("change", renderRequests);
  window.addEventListener("loraplex:adapters", renderModels);
  window.addEventListener("loraplex:key", renderRequests);
}

export async function show() {
  renderModels();
}

// --------------------------------------------------------------------------- form

const BASE = ""; // the checkbox value that stands for the base model

function renderModels() {
  const box = $("#pg-models");
  const checked = new Set([...box.querySelectorAll("input:checked")].map((i) => i.value));
  const first = box.querySelectorAll("input").length === 0;
  const choices = [BASE, ...state.adapters.map((a) => a.id)];
  const boxes = choices.map((value) =>
    el("label", { class: "check" },
      el("input", { type: "checkbox", name: "pg-model", value, checked: first || checked.has(value) }),
      value === BASE ? `base (${state.info?.model ?? "no adapter"})` : value),
  );
  box.replaceChildren(el("legend", {}, "Answer with"), ...boxes);
  renderRequests();
}

function params() {
  const number = (id) => {
    const raw = $(id).value.trim();
    return raw === "" ? null : Number(raw);
  };
  return {
    prompt: $("#pg-prompt").value,
    chat: $("#pg-chat").checked,
    maxTokens: number("#pg-max-tokens") ?? 40,
    temperature: number("#pg-temperature") ?? 0,
    topP: number("#pg-top-p") ?? 1,
    seed: number("#pg-seed"),
    models: [...$("#pg-models").querySelectorAll("input:checked")].map((i) => (i.value === BASE ? null : i.value)),
  };
}

/** The route and body one model's request uses (null: the base model). */
function requestFor(model, p) {
  if (p.chat) {
    const body = {
      model: model ?? state.info?.model ?? "tgi",
      messages: [{ role: "user", content: p.prompt }],
      max_tokens: p.maxTokens,
      temperature: p.temperature, // OpenAI's semantics: 0 is greedy
      stream: true,
    };
    if (p.topP < 1) body.top_p = p.topP;
    if (p.seed !== null) body.seed = p.seed;
    return { path: "/v1/chat/completions", body };
  }
  const parameters = { adapter_id: model, max_new_tokens: p.maxTokens };
  if (p.temperature > 0) Object.assign(parameters, { do_sample: true, temperature: p.temperature });
  if (p.topP < 1) parameters.top_p = p.topP;
  if (p.seed !== null) parameters.seed = p.seed;
  return { path: "/generate_stream", body: { inputs: p.prompt, parameters } };
}

/** The text a stream event adds (chat chunk or TGI token event). */
function eventText(event, chat) {
  if (chat) return event.choices?.[0]?.delta?.content ?? "";
  return event.token && !event.token.special ? event.token.text : "";
}

// --------------------------------------------------------------------------- run

async function run() {
  const p = params();
  if (!p.models.length) {
    showError(new Error("choose at least one adapter or the base model"));
    return;
  }
  running?.abort();
  const controller = new AbortController();
  running = controller;
  $("#pg-run").disabled = true;
  $("#pg-stop").disabled = false;
  const panels = p.models.map((model) => answerPanel(model));
  $("#pg-outputs").replaceChildren(...panels.map((x) => x.node));
  const batch = watchBatch();
  await Promise.all(panels.map((panel) => stream(panel, requestFor(panel.model, p), p.chat, controller.signal)));
  batch.stop();
  if (running === controller) running = null;
  $("#pg-run").disabled = false;
  $("#pg-stop").disabled = true;
}

/** While the answers stream, GET /info twice a second: the server's batch, and its peak. */
function watchBatch() {
  const line = $("#pg-batch");
  let peak = 0;
  let stopped = false;
  const tick = async () => {
    try {
      const info = await api("/info");
      if (stopped) return;
      peak = Math.max(peak, info.running_requests);
      line.textContent = `server batch: ${info.running_requests} running, ${info.waiting_requests} waiting · peak during this run: ${peak}`;
      line.dataset.peak = String(peak);
    } catch {
      // the answers show any refusal; this line only stops updating
    }
  };
  line.textContent = "";
  delete line.dataset.peak;
  tick();
  const timer = setInterval(tick, 500);
  return {
    stop() {
      stopped = true;
      clearInterval(timer);
      if (peak) line.textContent = `peak server batch during this run: ${peak} requests decoded together`;
    },
  };
}

function answerPanel(model) {
  const text = el("div", { class: "text" });
  const meta = el("div", { class: "meta" }, "waiting…");
  const name = model ?? "base";
  const node = el("div", { class: "answer", dataset: { model: name } }, el("h3", {}, name), text, meta);
  return { model, node, text, meta };
}

async function stream(panel, request, chat, signal) {
  const started = performance.now();
  let first = null;
  let tokens = 0;
  panel.node.dataset.state = "streaming";
  try {
    for await (const event of streamEvents(request.path, request.body, signal)) {
      const piece = eventText(event, chat);
      if (chat ? piece : event.token) tokens += 1;
      if (piece) {
        first ??= performance.now();
        panel.text.textContent += piece;
      }
      const elapsed = (performance.now() - started) / 1000;
      panel.meta.textContent = `${tokens} tokens · ${(tokens / Math.max(elapsed, 1e-3)).toFixed(1)} tokens/s`;
    }
    const total = (performance.now() - started) / 1000;
    const ttft = first === null ? "–" : `${((first - started) / 1000).toFixed(2)} s`;
    panel.meta.textContent = `${tokens} tokens in ${total.toFixed(2)} s · first token after ${ttft}`;
    panel.node.dataset.state = "done";
  } catch (err) {
    panel.node.dataset.state = err.name === "AbortError" ? "stopped" : "error";
    if (err.name === "AbortError") {
      panel.meta.textContent = `stopped after ${tokens} tokens`;
      return;
    }
    panel.node.classList.add("error");
    panel.text.textContent = err.describe ? err.describe() : String(err.message || err);
    panel.meta.textContent = "";
  }
}

// --------------------------------------------------------------------------- as curl and Python

const shellQuote = (s) => `'${s.replace(/'/g, `'\\''`)}'`;

/** A JSON value as a Python literal. */
function py(value, indent = "") {
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number" || typeof value === "string") return JSON.stringify(value);
  const inner = `${indent}    `;
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return `[\n${value.map((v) => inner + py(v, inner)).join(",\n")},\n${indent}]`;
  }
  const entries = Object.entries(value);
  if (!entries.length) return "{}";
  return `{\n${entries.map(([k, v]) => `${inner}${JSON.stringify(k)}: ${py(v, inner)}`).join(",\n")},\n${indent}}`;
}

function renderRequests() {
  const p = params();
  const requests = p.models.map((model) => requestFor(model, p));
  const auth = getKey() ? ` \\\n  -H "Authorization: Bearer $LORAPLEX_API_KEY"` : "";
  $("#pg-curl").textContent = requests.length
    ? requests
        .map((r) => `curl -sN ${location.origin}${r.path} \\\n  -H 'Content-Type: application/json'${auth} \\\n  -d ${shellQuote(JSON.stringify(r.body))}`)
        .join("\n\n")
    : "# choose at least one adapter or the base model";
  const path = p.chat ? "/v1/chat/completions" : "/generate_stream";
  const label = p.chat ? "body['model']" : "body['parameters']['adapter_id'] or 'base'";
  const text = p.chat
    ? 'event["choices"][0]["delta"].get("content") or "" if event["choices"] else ""'
    : '"" if event["token"]["special"] else event["token"]["text"]';
  $("#pg-python").textContent = [
    "import json",
    ...(getKey() ? ["import os"] : []),
    "",
    "import httpx",
    "",
    `URL = ${JSON.stringify(location.origin)}`,
    getKey() ? 'HEADERS = {"Authorization": "Bearer " + os.environ["LORAPLEX_API_KEY"]}' : "HEADERS = {}",
    `REQUESTS = ${py(requests.map((r) => r.body))}`,
    "",
    "for body in REQUESTS:  # one after the other here; the console sends them at once",
    `    print(f"--- {${label}}")`,
    `    with httpx.stream("POST", URL + ${JSON.stringify(path)}, json=body, headers=HEADERS, timeout=None) as response:`,
    "        response.raise_for_status()",
    "        for line in response.iter_lines():",
    '            if not line.startswith("data: ") or line == "data: [DONE]":',
    "                continue",
    "            event = json.loads(line[6:])",
    `            print(${text}, end="", flush=True)`,
    "    print()",
    "",
  ].join("\n");
  $("#pg-hint").textContent = p.chat
    ? "The prompt is the user message, wrapped in the model's chat template (/v1/chat/completions)."
    : "The prompt is sent as it is, no chat template (/generate_stream).";
}
