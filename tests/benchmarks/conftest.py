"""Fixtures of the benchmark tests. `one_thread`: one torch thread is fastest on the tiny models the benchmarks run
here, and the machine's cores are shared with the rest of the suite."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
