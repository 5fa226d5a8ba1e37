"""adapters/torch_threads.py: only the engine thread opens an OpenMP team.

A thread's team shows as OS threads (``/proc/self/task``) that live as long as the thread does;
a thread confined to one PyTorch thread starts none, and a passing thread's team ends with it."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import torch

from adapters.torch_threads import confine_this_thread, confined_thread, in_passing_thread, one_thread_pool
from tests.api_helpers import start_client


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def _parallel_op() -> None:
    torch.ones(1 << 20).mul_(2.0)  # 1M elements: far past PyTorch's grain, so it runs in a team


@pytest.fixture
def two_torch_threads() -> Iterator[None]:
    """PyTorch's default for new threads at 2 (one OpenMP worker beside each team's master)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _tasks_added_by(setup: Callable[[], object]) -> int:
    """OS threads added while a new thread, after ``setup()``, runs a parallel op (counted before
    it ends, while any team of its own is still alive)."""
    added: list[int] = []

    def run() -> None:
        setup()
        before = _tasks()
        _parallel_op()
        added.append(_tasks() - before)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return added[0]


def test_a_new_thread_opens_a_team_and_a_confined_one_does_not(two_torch_threads) -> None:
    assert _tasks_added_by(lambda: None) >= 1  # the control: its team's worker
    assert _tasks_added_by(confine_this_thread) <= 0


def test_confined_thread_restores_the_threads_count(two_torch_threads) -> None:
    def run() -> tuple[int, int]:
        with confined_thread():
            inside = torch.get_num_threads()
        return inside, torch.get_num_threads()

    assert in_passing_thread(run, "probe") == (1, 2)


def test_one_thread_pool_runs_torch_on_one_thread(two_torch_threads) -> None:
    with one_thread_pool(2, "probe") as pool:
        assert {pool.submit(torch.get_num_threads).result() for _ in range(4)} == {1}


def test_a_passing_threads_team_ends_with_it(two_torch_threads) -> None:
    before = _tasks()
    assert in_passing_thread(lambda: (_parallel_op(), 7)[1], "probe") == 7
    deadline = time.monotonic() + 5  # libgomp lets its workers go when their master's thread exits
    while _tasks() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _tasks() <= before


def test_in_passing_thread_raises_the_threads_error() -> None:
    def fail() -> None:
        raise ValueError("from the passing thread")

    with pytest.raises(ValueError, match="from the passing thread"):
        in_passing_thread(fail, "probe")


def test_the_server_confines_its_loop_and_workers(tiny_base, tokenizer, tiny_base_dir, tmp_path) -> None:
    client = start_client(tiny_base, tokenizer, tmp_path, model_path=tiny_base_dir, runner="native")
    try:
        assert client.portal.call(torch.get_num_threads) == 1  # the event loop's thread
        assert client.portal.call(asyncio.to_thread, torch.get_num_threads) == 1  # the API's workers
        body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
        assert client.post("/generate", json=body).status_code == 200
        assert not [t for t in threading.enumerate() if t.name == "loraplex-load"]  # the load's thread ended
    finally:
        client.__exit__(None, None, None)
