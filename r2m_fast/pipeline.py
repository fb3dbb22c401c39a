"""Overlap of computing and writing in a streamed merge, and the resident-inputs decision.

A merge hands each finished tensor to the writer; writing it (a copy into the page cache, the
shard's fsync at its end) takes as long as computing a baseline's tensor. BackgroundSink writes
on a thread while the next tensor is computed, holding at most `depth` finished tensors.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Callable, Optional

import torch

Sink = Callable[[str, torch.Tensor], None]

# R2M_RESIDENT=1/0 forces the inputs to stay mapped between passes, or to be released layer by layer.
RESIDENT_ENV = "R2M_RESIDENT"
# Inputs stay resident when they take at most this fraction of the memory available at the start.
RESIDENT_FRACTION = 0.5
_STOP = object()


def available_memory() -> Optional[int]:
    """MemAvailable from /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resident_fits(input_bytes: int, available: Optional[int] = None) -> bool:
    """Whether a multi-pass merge keeps its inputs mapped between passes: forced by R2M_RESIDENT,
    else when they fit in RESIDENT_FRACTION of the available memory (unknown: no)."""
    forced = os.environ.get(RESIDENT_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    available = available_memory() if available is None else available
    return available is not None and input_bytes <= RESIDENT_FRACTION * available


class BackgroundSink:
    """Calls `sink(name, tensor)` on a writer thread, in order. Use as a context manager: leaving the
    block waits for every tensor to be written (re-raising the writer's error) or, on an error,
    drops what is queued and stops. The caller must not modify a tensor after handing it over."""

    def __init__(self, sink: Sink, depth: int = 2):
        self._sink = sink
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: Optional[BaseException] = None
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name="r2m-writer", daemon=True)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None or self._abort.is_set():
                continue
            try:
                self._sink(*item)
            except BaseException as exc:  # handed to the merging thread at its next call
                self._error = exc

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((name, tensor))

    def __enter__(self) -> "BackgroundSink":
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort.set()
        self._queue.put(_STOP)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error
