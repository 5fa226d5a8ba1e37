"""``bench/load.py --tenants``: three tenants on one server, one of them hammering past its quota.

Two quiet tenants (``quiet-a``, ``quiet-b``) each run ``--users`` closed-loop users (0.05-0.3 s
between requests) on their own adapter ``bot`` (the same id in both namespaces, different weights).
The run has two phases of ``--duration`` seconds each, on the same server:

1. alone: only the quiet tenants;
2. with the noisy one: the same, plus ``--noisy-users`` users of tenant ``noisy`` (quota
   ``max_concurrent_requests`` = ``--noisy-concurrency``) that send requests back to back, and
   after a 429 retry 20 ms later.

Criterion (issue 28): each quiet tenant's p95 latency in phase 2 within 1.3x of phase 1; the noisy
tenant gets 429s (its quota holds) and the quiet ones only 200s.
"""

from __future__ import annotations

import datetime as dt
import io
import os
import random
import shlex
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import gevent
import httpx

from bench.common import machine_description, percentile, server_on_fresh_data

ADMIN_KEY = "bench-admin-key"
QUIET = ("quiet-a", "quiet-b")
NOISY = "noisy"
MAX_NEW_TOKENS = 24
PROMPT = "<|im_start|>user\nName three colors.<|im_end|>\n<|im_start|>assistant\n"


def _parts(files: tuple[bytes, bytes]) -> list:
    return [
        ("files", ("adapter_config.json", files[0], "application/json")),
        ("files", ("adapter_model.safetensors", files[1], "application/octet-stream")),
    ]


def setup(url: str, args, random_like, template: Path) -> dict[str, dict[str, str]]:
    """The three tenants, each with its own ``bot``; their Authorization headers."""
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    headers = {}
    for seed, tenant in enumerate((*QUIET, NOISY)):
        quotas = {"max_concurrent_requests": args.noisy_concurrency} if tenant == NOISY else {}
        made = httpx.post(url + "/admin/tenants", json={"id": tenant, **quotas}, headers=admin, timeout=30)
        assert made.status_code == 201, made.text
        headers[tenant] = {"Authorization": f"Bearer {made.json()['key']}"}
        up = httpx.post(url + "/adapters", files=_parts(random_like(template, seed=100 + seed)),
                        data={"adapter_id": "bot"}, headers=headers[tenant], timeout=60)  # fmt: skip
        assert up.status_code == 201, up.text
    return headers


def phase(url: str, headers: dict[str, dict[str, str]], args, noisy: bool) -> tuple[dict, dict]:
    """Run one phase; per tenant: latencies of 200s, and statuses."""
    latency: dict[str, list[float]] = defaultdict(list)
    statuses: dict[str, Counter] = defaultdict(Counter)
    stop = time.monotonic() + args.duration
    body = {"inputs": PROMPT, "parameters": {"adapter_id": "bot", "max_new_tokens": MAX_NEW_TOKENS}}

    def quiet_user(tenant: str) -> None:
        with httpx.Client(base_url=url, headers=headers[tenant], timeout=120) as client:
            while time.monotonic() < stop:
                started = time.perf_counter()
                r = client.post("/generate", json=body)
                statuses[tenant][r.status_code] += 1
                if r.status_code == 200:
                    latency[tenant].append(time.perf_counter() - started)
                gevent.sleep(random.uniform(0.05, 0.3))

    def noisy_user() -> None:
        with httpx.Client(base_url=url, headers=headers[NOISY], timeout=120) as client:
            while time.monotonic() < stop:
                r = client.post("/generate", json=body)
                statuses[NOISY][r.status_code] += 1
                if r.status_code == 429:
                    gevent.sleep(0.02)

    jobs = [gevent.spawn(quiet_user, t) for t in QUIET for _ in range(args.users)]
    if noisy:
        jobs += [gevent.spawn(noisy_user) for _ in range(args.noisy_users)]
    gevent.joinall(jobs, timeout=args.duration + 180)
    return latency, statuses


def run_tenants(args, random_like, template: Path) -> int:
    os.environ["LORAPLEX_ADMIN_KEY"] = ADMIN_KEY  # inherited by the server process
    with server_on_fresh_data(args.model) as (server, serve_args):
        headers = setup(server.url, args, random_like, template)
        for tenant in (*QUIET, NOISY):  # warm each adapter into memory once
            httpx.post(server.url + "/generate", headers=headers[tenant], timeout=120,
                       json={"inputs": PROMPT, "parameters": {"adapter_id": "bot", "max_new_tokens": 4}})  # fmt: skip
        alone = phase(server.url, headers, args, noisy=False)
        loud = phase(server.url, headers, args, noisy=True)
    report, passed = render(args, serve_args, alone, loud)
    print(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"written to {out}")
    return 0 if passed else 1


def _p(values: list[float], q: float) -> float:
    return percentile(values, q) * 1000 if values else float("nan")


def render(args, serve_args, alone, loud) -> tuple[str, bool]:
    (lat1, st1), (lat2, st2) = alone, loud
    ratios = {t: _p(lat2[t], 95) / _p(lat1[t], 95) for t in QUIET}
    quiet_ok = all(set(st1[t]) | set(st2[t]) == {200} for t in QUIET)
    criteria = [
        (f"quiet tenants' p95 within {args.max_ratio}x of the run without the noisy one",
         all(r <= args.max_ratio for r in ratios.values()), ", ".join(f"{t}: {r:.2f}x" for t, r in ratios.items())),
        ("the noisy tenant is refused past its quota (429)", st2[NOISY][429] > 0, f"{st2[NOISY][429]} answers 429"),
        ("the quiet tenants get only 200s", quiet_ok, "; ".join(f"{t}: {dict(st1[t] + st2[t])}" for t in QUIET)),
    ]  # fmt: skip
    passed = all(ok for _, ok, _ in criteria)
    command = "python bench/load.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out = io.StringIO()
    w = out.write
    w("# Tenants under load: one noisy tenant past its quota (CPU)\n\n")
    w(f"- date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC\n- machine: {machine_description()}\n")
    w(f"- command: `{command.strip()}`\n- server: `loraplex serve {' '.join(serve_args[2:])}` with "
      f"LORAPLEX_ADMIN_KEY, model {args.model or 'embedded SmolLM2-135M-Instruct'}, on loopback; the load "
      "generator (gevent + httpx) runs on the same cores\n")  # fmt: skip
    w(f"- load: tenants {', '.join(QUIET)} with {args.users} users each ({MAX_NEW_TOKENS} new tokens a request, "
      f"their own adapter `bot`); phase 2 adds {args.noisy_users} users of `{NOISY}` "
      f"(max_concurrent_requests={args.noisy_concurrency}) sending back to back; {args.duration:g} s a phase\n\n")  # fmt: skip
    w("## Pass criteria\n\n| criterion | result | detail |\n| --- | --- | --- |\n")
    for name, ok, detail in criteria:
        w(f"| {name} | {'PASS' if ok else 'FAIL'} | {detail} |\n")
    w("\n## Latency of 200 answers (ms)\n\n| tenant | phase | requests | p50 | p95 | p99 |\n")
    w("| --- | --- | ---: | ---: | ---: | ---: |\n")
    for name, (lat, _) in (("alone", alone), ("with noisy", loud)):
        for t in (*QUIET, NOISY):
            if lat[t]:
                w(
                    f"| {t} | {name} | {len(lat[t])} | {_p(lat[t], 50):.0f} | {_p(lat[t], 95):.0f} | {_p(lat[t], 99):.0f} |\n"
                )
    w("\n## Answers by status\n\n| tenant | phase | statuses |\n| --- | --- | --- |\n")
    for name, (_, st) in (("alone", alone), ("with noisy", loud)):
        for t in (*QUIET, NOISY):
            if st[t]:
                w(f"| {t} | {name} | {', '.join(f'{s}: {n}' for s, n in sorted(st[t].items()))} |\n")
    return out.getvalue(), passed
