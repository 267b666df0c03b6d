"""Run checkpoint writes on a background thread, in order, with a bounded number of layers in flight.

Writing a layer (packing, device→host copies, shard files) used to stall the pipeline for ~0.15 s per
Llama-3-8B layer on an H100 (benchmarks/gpu.md, P5b). `BackgroundWriter.submit(write)` queues a write and
returns; one thread runs the writes in submission order, so the sinks see exactly the same calls in the
same order as before and the checkpoint is byte-identical.

* Memory: `submit` blocks while `max_pending` writes are queued or running, so at most that many layers'
  tensors are held on their way to disk.
* CUDA: `submit` records an event on the caller's current stream; the thread waits for it on its own stream
  (so the copies do not queue behind the next layer's kernels) and synchronises that stream before it drops
  the tensors, so the caching allocator never hands their memory to the main stream while still in use.
  The main thread must not modify submitted tensors in place (the pipeline only frees them).
* Errors: the first exception of a write is re-raised in the caller by the next `submit` or by `close`; the
  writes after it are skipped, never silently reported as done. On an exception in the caller (e.g. a
  cancelled job) `__exit__` lets the writes already queued finish (at most `max_pending`, as the old
  synchronous loop had written them too), joins the thread and lets the caller's exception propagate: no
  thread outlives the job, and the engine then removes its staging directory.

With `enabled=False` writes run synchronously in `submit` (the previous behaviour, kept as a switch).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType

import torch

Write = Callable[[], object]  # its result is ignored


class BackgroundWriter:
    def __init__(self, device: torch.device, *, max_pending: int = 2, enabled: bool = True) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending={max_pending} must be at least 1")
        self.device, self.enabled = device, enabled
        self._cuda = device.type == "cuda" and torch.cuda.is_available()
        self._slots = threading.BoundedSemaphore(max_pending)
        self._queue: queue.SimpleQueue[tuple[Write, torch.cuda.Event | None] | None] = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stream = torch.cuda.Stream(device) if enabled and self._cuda else None
        if enabled:
            self._thread = threading.Thread(target=self._run, name="qf-writer", daemon=True)
            self._thread.start()

    def submit(self, write: Write) -> None:
        """Queue `write` (run after everything submitted before it); raises an earlier write's error."""
        self._raise_error()
        if self._thread is None:
            write()
            return
        self._slots.acquire()
        event = None
        if self._cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        self._queue.put((write, event))
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            write, event = item
            try:
                if self._error is None:
                    self._write(write, event)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread, re-raised there
                self._error = exc
            finally:
                del write, item  # drop the tensors before a new write may be queued
                self._slots.release()

    def _write(self, write: Write, event: torch.cuda.Event | None) -> None:
        with torch.no_grad():  # grad mode is per thread
            if self._stream is None or event is None:
                write()
                return
            with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
                self._stream.wait_event(event)
                try:
                    write()
                finally:  # its tensors may be freed once this returns
                    self._stream.synchronize()

    def close(self) -> None:
        """Wait for every queued write; raise the first write error, if any."""
        self._stop()
        self._raise_error()

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self._stop()  # the caller's exception wins over a write error
