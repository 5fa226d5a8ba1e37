"""Load and soak benchmark: a crowd of locust users against a `loraplex serve` it starts on loopback.

Traffic (closed loop, each user waits 0.05-0.3 s between requests), each user repeating a fixed
cycle of 20 requests that starts with its bad one (so even a few seconds' run judges every criterion):
  35% POST /generate (greedy), 35% POST /generate_stream (greedy), 25% POST /v1/chat/completions
  (sampled, seeded), 5% bad requests (unknown adapter, out-of-range parameter, malformed JSON,
  invalid adapter id, unknown OpenAI model), spread over the base model and 4 adapters (the two
  trained examples and two random ones); plus one admin user that uploads a throwaway adapter,
  generates with it and deletes it, again and again.

Measured: requests/s, generated tokens/s, latency p50/p95/p99 per kind, time to first token and
inter-token latency (streams), errors by status, the server's RSS over time. Pass criteria
(printed, and the exit status): no 5xx, no connection errors, every bad request answered 4xx,
every good request 200, and a fixed set of greedy probes answers the same during the load as
alone. Results go to bench/results/load-cpu.md (or --out).

With ``--tenants``: three tenants, one hammering past its quota (``bench/tenant_load.py``; issue 28),
written to bench/results/tenants-cpu.md.

Run:  .venv/bin/python bench/load.py                      # 24 users, 120 s (make bench)
      .venv/bin/python bench/load.py --tenants --users 2 --duration 60   # three tenants, two phases
      .venv/bin/python bench/load.py --soak               # 24 users, 600 s, RSS steadiness checked
      .venv/bin/python bench/load.py --model DIR --users 4 --duration 5 --out /tmp/x.md   (a smoke run)
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()  # before anything opens a socket: locust's users are greenlets

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import httpx  # noqa: E402
import torch  # noqa: E402
from locust import HttpUser, between, events, task  # noqa: E402
from locust.env import Environment  # noqa: E402
from safetensors.torch import load_file, save  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, ServerProcess, machine_description, percentile, server_on_fresh_data  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "What is 12 plus 30?",
    "Give me a tip for sleeping well.",
    "Why is the sky blue?",
    "What does a compiler do?",
]
EXAMPLES = ROOT / "examples" / "adapters"
ADAPTERS = ["caps", "pirate", "rand1", "rand2"]
MAX_NEW_TOKENS = 24
PROBE_TOKENS = 16


def chat_prompt(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


# --------------------------------------------------------------------------- adapters


def random_like(template: Path, seed: int) -> tuple[bytes, bytes]:
    """An adapter with ``template``'s config and shapes and random factors."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, t in load_file(str(template / "adapter_model.safetensors")).items():
        if "lora_A" in name:
            tensors[name] = torch.randn(t.shape, generator=generator) / t.shape[1] ** 0.5
        else:
            tensors[name] = torch.randn(t.shape, generator=generator) * 0.02
    return (template / "adapter_config.json").read_bytes(), save(tensors)


def adapter_files(name: str) -> tuple[bytes, bytes]:
    if (EXAMPLES / name).is_dir():
        folder = EXAMPLES / name
        return (folder / "adapter_config.json").read_bytes(), (
            folder / "adapter_model.safetensors"
        ).read_bytes()
    return random_like(EXAMPLES / "caps", seed=sum(map(ord, name)))


def upload(url: str, adapter_id: str, files: tuple[bytes, bytes], client=None) -> int:
    parts = [
        ("files", ("adapter_config.json", files[0], "application/json")),
        ("files", ("adapter_model.safetensors", files[1], "application/octet-stream")),
    ]
    post = client.post if client is not None else httpx.post  # locust's client takes paths
    return post(url + "/adapters", files=parts, data={"adapter_id": adapter_id}, timeout=60).status_code


# --------------------------------------------------------------------------- what is recorded


@dataclass
class Recorder:
    """Everything the users observe; greenlets share it (no threads: no locks needed)."""

    latency: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    bad_not_4xx: list[str] = field(default_factory=list)
    good_not_200: list[str] = field(default_factory=list)
    churn: Counter = field(default_factory=Counter)
    measuring: bool = True

    def good(
        self, kind: str, status: int, seconds: float, tokens: int, text: str = "", expected: int = 200
    ) -> None:
        if not self.measuring:
            return
        self.statuses[kind][status] += 1
        if status != expected:
            self.good_not_200.append(f"{kind} {status} {text[:160]}")
        elif seconds > 0:
            self.latency[kind].append(seconds)
            self.tokens += tokens

    def bad(self, kind: str, status: int, seconds: float, text: str) -> None:
        if not self.measuring:
            return
        self.statuses["bad"][status] += 1
        self.latency["bad"].append(seconds)
        if not 400 <= status < 500:
            self.bad_not_4xx.append(f"{kind} {status} {text[:160]}")


RECORD = Recorder()
_counter = itertools.count()


def _pick() -> tuple[str, str | None]:
    i = next(_counter)
    adapters = [None, *ADAPTERS]
    return QUESTIONS[i % len(QUESTIONS)], adapters[(i // len(QUESTIONS)) % len(adapters)]


def _judge(response, ok: bool) -> None:
    """Tell locust's own statistics whether this answer was the expected one."""
    if ok:
        response.success()
    else:
        response.failure(f"unexpected {response.status_code}: {response.text[:200]}")


class Client(HttpUser):
    """One person using the API: generate, stream, chat, and now and then a bad request."""

    wait_time = between(0.05, 0.3)
    # One cycle: 1 bad, 7 generate, 7 stream, 5 chat (5% / 35% / 35% / 25%), the bad one first.
    CYCLE = ("bad_request", *("generate", "stream", "chat") * 5, *("generate", "stream") * 2)

    def on_start(self) -> None:
        self.sent = 0

    @task
    def next_in_cycle(self) -> None:
        getattr(self, self.CYCLE[self.sent % len(self.CYCLE)])()
        self.sent += 1

    def generate(self) -> None:
        question, adapter = _pick()
        body = {
            "inputs": chat_prompt(question),
            "parameters": {"adapter_id": adapter, "max_new_tokens": MAX_NEW_TOKENS},
        }
        started = time.perf_counter()
        with self.client.post("/generate", json=body, catch_response=True, name="/generate") as r:
            tokens = r.json()["details"]["generated_tokens"] if r.status_code == 200 else 0
            RECORD.good("generate", r.status_code, time.perf_counter() - started, tokens, r.text)
            _judge(r, r.status_code == 200)

    def stream(self) -> None:
        question, adapter = _pick()
        body = {
            "inputs": chat_prompt(question),
            "parameters": {"adapter_id": adapter, "max_new_tokens": MAX_NEW_TOKENS},
        }
        started = time.perf_counter()
        stamps: list[float] = []
        with self.client.post("/generate_stream", json=body, stream=True, catch_response=True,
                              name="/generate_stream") as r:  # fmt: skip
            if r.status_code == 200:
                for line in r.iter_lines():
                    if line.startswith(b"data:") and json.loads(line[5:]).get("token"):
                        stamps.append(time.perf_counter())
            RECORD.good(
                "stream", r.status_code, time.perf_counter() - started, len(stamps), "" if stamps else r.text
            )
            _judge(r, r.status_code == 200)
        if stamps and RECORD.measuring:
            RECORD.ttft.append(stamps[0] - started)
            RECORD.itl.extend(b - a for a, b in itertools.pairwise(stamps))

    def chat(self) -> None:
        question, adapter = _pick()
        body = {
            "model": adapter or "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": question}],
            "max_tokens": MAX_NEW_TOKENS,
            "temperature": 0.8,
            "seed": next(_counter),
        }
        started = time.perf_counter()
        with self.client.post(
            "/v1/chat/completions", json=body, catch_response=True, name="/v1/chat/completions"
        ) as r:
            tokens = r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0
            RECORD.good("chat", r.status_code, time.perf_counter() - started, tokens, r.text)
            _judge(r, r.status_code == 200)

    def bad_request(self) -> None:
        kind = next(_counter) % 5
        prompt = chat_prompt("Hi")
        started = time.perf_counter()
        if kind == 0:
            args = (
                "/generate",
                {"json": {"inputs": prompt, "parameters": {"adapter_id": "no-such-adapter"}}},
            )
        elif kind == 1:
            args = ("/generate", {"json": {"inputs": prompt, "parameters": {"max_new_tokens": -3}}})
        elif kind == 2:
            args = (
                "/generate",
                {"data": b'{"inputs": "Hi", ', "headers": {"content-type": "application/json"}},
            )
        elif kind == 3:
            args = (
                "/generate",
                {"json": {"inputs": prompt, "parameters": {"adapter_id": "../../etc/passwd"}}},
            )
        else:
            args = (
                "/v1/chat/completions",
                {"json": {"model": "nope", "messages": [{"role": "user", "content": "Hi"}]}},
            )
        path, kwargs = args
        with self.client.post(path, catch_response=True, name=f"bad {path}", **kwargs) as r:
            RECORD.bad(f"bad{kind}", r.status_code, time.perf_counter() - started, r.text)
            _judge(r, 400 <= r.status_code < 500)


class AdapterChurn(HttpUser):
    """Uploads a throwaway adapter, uses it once, deletes it; over and over."""

    fixed_count = 1
    wait_time = between(2, 4)
    files = None

    @task
    def churn(self) -> None:
        adapter_id = f"throwaway-{next(_counter)}"
        status = upload("", adapter_id, AdapterChurn.files, client=self.client)
        RECORD.good("churn upload", status, 0.0, 0, expected=201)
        body = {"inputs": chat_prompt("Hi"), "parameters": {"adapter_id": adapter_id, "max_new_tokens": 8}}
        r = self.client.post("/generate", json=body, name="/generate (throwaway)")
        RECORD.good("churn generate", r.status_code, 0.0, 0, r.text)
        r = self.client.delete(f"/adapters/{adapter_id}", name="/adapters/{id}")
        RECORD.good("churn delete", r.status_code, 0.0, 0, r.text, expected=204)
        if r.status_code == 204 and RECORD.measuring:
            RECORD.churn["uploaded and deleted"] += 1


# --------------------------------------------------------------------------- probes and RSS


PROBES = [(q, a) for q in QUESTIONS[:3] for a in (None, "caps", "pirate")]


def run_probes(url: str) -> list[str]:
    """The fixed greedy probe set, one request after another."""
    out = []
    with httpx.Client(timeout=120) as client:
        for question, adapter in PROBES:
            body = {
                "inputs": chat_prompt(question),
                "parameters": {"adapter_id": adapter, "max_new_tokens": PROBE_TOKENS},
            }
            r = client.post(url + "/generate", json=body)
            out.append(r.json()["generated_text"] if r.status_code == 200 else f"<{r.status_code}>")
    return out


def sample_rss(server: ServerProcess, every: float, samples: list[tuple[float, float]], t0: float) -> None:
    while True:
        samples.append((time.monotonic() - t0, server.memory_kib("VmRSS") / 1024))
        gevent.sleep(every)


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> int:
    with server_on_fresh_data(args.model) as (server, serve_args):
        return measure(server, args, serve_args)


def measure(server: ServerProcess, args: argparse.Namespace, serve_args: list[str]) -> int:
    url = server.url
    for name in ADAPTERS:
        assert upload(url, name, adapter_files(name)) == 201, f"could not upload {name}"
    AdapterChurn.files = random_like(EXAMPLES / "caps", seed=99)
    run_probes(url)  # warm every adapter into memory once
    alone = run_probes(url)

    env = Environment(user_classes=[Client, AdapterChurn], events=events, host=url)
    runner = env.create_local_runner()
    rss: list[tuple[float, float]] = []
    t0 = time.monotonic()
    sampler = gevent.spawn(sample_rss, server, args.rss_every, rss, t0)
    runner.start(args.users + 1, spawn_rate=max(args.users / 5, 1))
    during: list[str] = []
    probe = gevent.spawn_later(args.duration / 2, lambda: during.extend(run_probes(url)))
    gevent.sleep(args.duration)
    RECORD.measuring = False
    elapsed = time.monotonic() - t0
    runner.quit()
    probe.join(timeout=300)
    sampler.kill()
    rss.append((time.monotonic() - t0, server.memory_kib("VmRSS") / 1024))
    stats = env.stats.total
    report, passed = render(
        args, serve_args, elapsed, alone, during, rss, stats.num_requests, stats.num_failures
    )
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"written to {out}")
    return 0 if passed else 1


def _pcts(values: list[float], scale: float = 1000.0) -> str:
    if not values:
        return "- | - | -"
    return " | ".join(f"{percentile(values, q) * scale:.0f}" for q in (50, 95, 99))


def render(args, serve_args, elapsed, alone, during, rss, num_requests, num_failures) -> tuple[str, bool]:
    statuses = Counter()
    for counter in RECORD.statuses.values():
        statuses.update(counter)
    five_xx = sum(n for s, n in statuses.items() if s >= 500)
    conn_errors = statuses.get(0, 0)
    bad_total = sum(RECORD.statuses["bad"].values())
    warm_at = args.warmup
    after_warmup = next((mib for t, mib in rss if t >= warm_at), rss[0][1])
    growth = (rss[-1][1] - after_warmup) / after_warmup * 100
    criteria = [
        ("no 5xx", five_xx == 0, f"{five_xx} answers were 5xx"),
        ("no connection errors", conn_errors == 0, f"{conn_errors} connection errors"),
        ("every bad request a 4xx", not RECORD.bad_not_4xx and bad_total > 0,
         f"{bad_total} bad requests, {len(RECORD.bad_not_4xx)} not 4xx {RECORD.bad_not_4xx[:3]}"),
        ("every good request a 200 (201/204 for writes)", not RECORD.good_not_200,
         f"{len(RECORD.good_not_200)} not 200 {RECORD.good_not_200[:3]}"),
        ("greedy probes equal during load and alone", during == alone and len(during) == len(PROBES),
         f"{sum(a == b for a, b in zip(alone, during, strict=False))}/{len(PROBES)} equal"),
    ]  # fmt: skip
    if args.soak:
        criteria.append(("RSS growth after warm-up under 5%", growth < 5, f"{growth:+.1f}%"))
    passed = all(ok for _, ok, _ in criteria)
    good = sum(len(RECORD.latency[k]) for k in ("generate", "stream", "chat"))
    command = "python bench/load.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out = io.StringIO()
    w = out.write
    w(f"# Load {'soak ' if args.soak else ''}benchmark (CPU)\n\n")
    w(f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC\n- machine: {machine_description()}\n")
    w(f"- command: `{command.strip()}`\n- server: `loraplex serve {' '.join(serve_args[2:])}` (defaults otherwise: "
      f"auto mode), model {'embedded SmolLM2-135M-Instruct' if not args.model else args.model}, on loopback; "
      f"the load generator (locust {__import__('locust').__version__}) runs on the same cores\n")  # fmt: skip
    w(f"- load: {args.users} users + 1 adapter-churn user for {elapsed:.0f} s; {MAX_NEW_TOKENS} new tokens per "
      "request; base model and 4 adapters (caps, pirate, 2 random) in turn\n\n")  # fmt: skip
    w("## Pass criteria\n\n| criterion | result | detail |\n| --- | --- | --- |\n")
    for name, ok, detail in criteria:
        w(f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |\n")
    w("\n## Throughput\n\n")
    w(f"- requests: {num_requests} ({num_requests / elapsed:.1f}/s), of which good generations {good} "
      f"({good / elapsed:.2f}/s); locust counted {num_failures} failures\n")  # fmt: skip
    w(f"- generated tokens: {RECORD.tokens} ({RECORD.tokens / elapsed:.1f} tokens/s)\n")
    w(f"- throwaway adapters uploaded, used and deleted: {RECORD.churn['uploaded and deleted']}\n\n")
    w("## Latency (ms)\n\n| kind | requests | p50 | p95 | p99 |\n| --- | ---: | ---: | ---: | ---: |\n")
    for kind in ("generate", "stream", "chat", "bad"):
        w(f"| {kind} (whole request) | {len(RECORD.latency[kind])} | {_pcts(RECORD.latency[kind])} |\n")
    w(f"| time to first token (streams) | {len(RECORD.ttft)} | {_pcts(RECORD.ttft)} |\n")
    w(f"| inter-token latency (streams) | {len(RECORD.itl)} | {_pcts(RECORD.itl)} |\n\n")
    w("## Answers by status\n\n| kind | statuses |\n| --- | --- |\n")
    for kind, counter in sorted(RECORD.statuses.items()):
        w(f"| {kind} | {', '.join(f'{s}: {n}' for s, n in sorted(counter.items()))} |\n")
    w(f"\n## Server memory (RSS, MiB)\n\nAfter warm-up ({warm_at:g} s): {after_warmup:.0f}; at the end: {rss[-1][1]:.0f} "
      f"({growth:+.1f}%); peak: {max(m for _, m in rss):.0f}.\n\n| t (s) | RSS |\n| ---: | ---: |\n")  # fmt: skip
    step = max(1, len(rss) // 24)
    for t, mib in rss[::step] + ([rss[-1]] if (len(rss) - 1) % step else []):
        w(f"| {t:.0f} | {mib:.0f} |\n")
    return out.getvalue(), passed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=24)
    parser.add_argument("--duration", type=float, default=None, help="seconds (120; 600 with --soak)")
    parser.add_argument(
        "--soak", action="store_true", help="10-minute soak; RSS growth after warm-up under 5%"
    )
    parser.add_argument("--model", default=None, help="local model dir (default: the embedded model)")
    parser.add_argument(
        "--out", default=None, help="report path (bench/results/load-cpu.md, load-soak-cpu.md)"
    )
    parser.add_argument(
        "--tenants", action="store_true", help="three tenants, one noisy (bench/tenant_load.py)"
    )
    parser.add_argument("--noisy-users", type=int, default=4, help="--tenants: users of the noisy tenant")
    parser.add_argument(
        "--noisy-concurrency", type=int, default=1, help="--tenants: its max_concurrent_requests"
    )
    parser.add_argument("--max-ratio", type=float, default=1.3, help="--tenants: allowed p95 ratio")
    args = parser.parse_args()
    if args.tenants:
        from bench.tenant_load import run_tenants

        args.duration = args.duration or 60.0
        args.out = args.out or str(ROOT / "bench" / "results" / "tenants-cpu.md")
        return run_tenants(args, random_like, EXAMPLES / "caps")
    if args.duration is None:
        args.duration = 600.0 if args.soak else 120.0
    args.warmup = min(60.0, args.duration / 4)
    args.rss_every = 10.0 if args.duration >= 300 else 5.0 if args.duration >= 60 else 1.0
    if args.out is None:
        args.out = str(ROOT / "bench" / "results" / ("load-soak-cpu.md" if args.soak else "load-cpu.md"))
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
