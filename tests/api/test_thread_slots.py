"""ThreadSlots (QF_SUBMIT_THREADS): at most N calls on threads at once, the others start in arrival order."""

from __future__ import annotations

import asyncio
import threading
import time

from fastapi.testclient import TestClient

from api.main import create_app
from api.thread_slots import ThreadSlots
from orchestrator.settings import Settings
from tests.api.test_jobs_api import job_rows


def test_at_most_total_calls_run_at_once_and_they_start_in_arrival_order() -> None:
    slots = ThreadSlots(3)
    lock = threading.Lock()
    done = [threading.Event() for _ in range(8)]
    running, most, started = 0, 0, []

    def work(i: int) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            started.append(i)
        done[i].wait(timeout=30)
        with lock:
            running -= 1
        return i * i

    async def until_started(n: int) -> None:
        deadline = time.monotonic() + 30
        while len(started) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # room for one more to start, were it let in

    async def main() -> list[int]:
        calls = []
        for i in range(8):
            calls.append(asyncio.create_task(slots.run(work, i)))
            await asyncio.sleep(0)  # arrive one after the other
        await until_started(3)
        assert sorted(started) == [0, 1, 2] and slots.busy() == 3
        for i in range(5):  # each finished call lets in exactly the next one to arrive
            done[i].set()
            await until_started(i + 4)
            assert started[3:] == list(range(3, i + 4))
        for event in done:
            event.set()
        return list(await asyncio.gather(*calls))

    assert asyncio.run(main()) == [i * i for i in range(8)]
    assert most == 3


def test_submits_beyond_the_threads_wait_their_turn_and_all_get_in(
    settings: Settings, keys: dict, job_body: dict
) -> None:
    one_thread = settings.model_copy(update={"submit_threads": 1})
    codes: list[int] = []
    with TestClient(create_app(one_thread)) as c:
        threads = [
            threading.Thread(
                target=lambda: codes.append(c.post("/v1/jobs", json=job_body, headers=keys["alice"]).status_code)
            )
            for _ in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert codes == [202] * 6
    assert job_rows(settings) == 6
