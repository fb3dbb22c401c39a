"""Overlap in a streamed merge (layers on worker threads, a writer thread) and the resident-inputs decision.

A merge hands each finished tensor to the writer; writing it (a copy into the page cache, the
shard's fsync at its end) takes as long as computing a baseline's tensor. BackgroundSink writes
on a thread while the next tensor is computed, holding at most `depth` finished tensors.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Optional, TypeVar

import torch

Sink = Callable[[str, torch.Tensor], None]
T = TypeVar("T")

# R2M_RESIDENT=1/0 forces the inputs to stay mapped between passes, or to be released layer by layer.
RESIDENT_ENV = "R2M_RESIDENT"
# Inputs stay resident when they take at most this fraction of the memory available at the start.
RESIDENT_FRACTION = 0.5
# R2M_FSYNC=1 flushes each output shard to the disk before the folder is renamed into place.
FSYNC_ENV = "R2M_FSYNC"
_STOP = object()


def fsync_output() -> bool:
    """Whether r2m-merge fsyncs its output shards (off unless R2M_FSYNC=1). The folder appears
    atomically either way (written aside, renamed when complete), so an interrupted or failed
    merge leaves nothing; what fsync adds is durability across a power loss right after the
    merge, at the disk's write rate (seconds per GB on common disks: often longer than the merge).
    mergekit, safetensors and transformers' save_pretrained do not fsync either."""
    return os.environ.get(FSYNC_ENV, "0").strip() == "1"


def proc_kib_field(path: str, key: str) -> Optional[int]:
    """The ``key: N kB`` line of a /proc file (/proc/meminfo, /proc/self/status) in bytes, or None
    where there is no such file or line."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(f"{key}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory() -> Optional[int]:
    """MemAvailable from /proc/meminfo in bytes (None where there is none)."""
    return proc_kib_field("/proc/meminfo", "MemAvailable")


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

    def destination(self, name: str) -> Optional[torch.Tensor]:
        """The sink's place for tensor `name` (ShardedSafetensorsWriter.destination), or None."""
        destination = getattr(self._sink, "destination", None)
        return None if destination is None else destination(name)

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


# Most layers processed at once on CPU. Each worker holds one layer's work buffers (for R²M N fp32
# copies of the largest layer), so this bounds memory; beyond it ops go multi-threaded instead.
MAX_LAYER_WORKERS = 4


def cpu_workers(device: torch.device) -> int:
    """Layers processed at once: on a CPU with up to MAX_LAYER_WORKERS torch threads, one per thread
    (each op then single-threaded); else one, with multi-threaded ops (also on other devices).
    Independent layers on separate threads keep every core busy without the barrier at the end of
    each multi-threaded op, which stalls the whole op whenever one of its threads is descheduled:
    on a shared 2-core machine R²M ran 2× slower multi-threaded than on one thread."""
    threads = max(1, torch.get_num_threads())
    return threads if device.type == "cpu" and threads <= MAX_LAYER_WORKERS else 1


@contextmanager
def one_thread_per_worker(workers: int) -> Iterator[None]:
    """torch ops single-threaded while `workers` threads run layers side by side."""
    if workers <= 1:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _without_grad(fn: Callable[..., T], *args) -> T:
    # Grad mode is per thread: the caller's torch.no_grad() does not reach the workers.
    with torch.no_grad():
        return fn(*args)


def ordered_map(fn: Callable[..., T], args: Iterable[tuple], workers: int) -> Iterator[T]:
    """fn(*a) for each a in `args`, results in order, at most `workers` running at once and one more
    queued (so a worker that finishes early starts the next layer instead of waiting for the oldest).
    `args` is drawn lazily on the calling thread (loads happen there), results are consumed there."""
    if workers <= 1:
        for a in args:
            yield fn(*a)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="r2m-layer") as pool:
        pending: deque = deque()
        for a in args:
            pending.append(pool.submit(_without_grad, fn, *a))
            if len(pending) > workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
