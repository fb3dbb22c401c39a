"""Spill R²M's between-pass tensors to disk, so that a streamed merge's memory does not grow with the model.

What a merge keeps across layers (DESIGN §2–3): pass 1 → 2 the sketches Zⱼ of every truncated layer,
(N, m, s) fp32; pass 2 → 3 its rank-r residual factors, (N, m, r) and (N, n, r) fp32. Together about
3·rank_ratio·N × one model's truncated weights in fp32 — ~53 GB for a LLaMA-7B shape with N = 8 and
rank ratio 0.1. With a :class:`Spill` they
go to files in a private temporary folder instead, one file per layer and kind, each written once and
read back once:

    pass 1   sketch of layer l  → written
    pass 2   sketch of layer l  → read, factored, deleted; its factors → written
    pass 3   factors of layer l → read; the folder goes when the merge ends

so the disk holds at most all the sketches (end of pass 1) or all the factors (end of pass 2), about
2·rank_ratio·N × those weights. Memory holds one layer's, and N kept σ² per layer.

Files are safetensors written with r2m_fast.io.write_safetensors (raw bytes straight from the tensor,
no fsync: they are scratch) and read with r2m_fast.io.SafetensorsFile (one positional read per tensor
into a buffer of its own, no memory map, so no pages stay resident), so a tensor reads back bit for
bit in any dtype. The folder (`r2m-spill-<host>-<pid>-*`, named after its process so that the next spill
into the same folder can remove it if that process was killed outright) is created inside the folder
the user names and is
removed on close, when the ``with`` block of the Spill ends (normally, on an exception, on
KeyboardInterrupt or on a SystemExit from a signal handler), and at interpreter exit if nothing closed it.
Each spilled write also gives glibc's heap slack back to the OS once it has grown (release_heap_slack).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import errno
import shutil
import weakref
from pathlib import Path
from typing import Any, Iterator, MutableMapping, Optional, Union

import torch

from r2m_fast.factors import ResidualFactors
from r2m_fast.io import SafetensorsFile, write_safetensors
from r2m_fast.plan import MergeInputError
from r2m_fast.safety import OutputError, format_bytes, free_bytes, owned_temp_dir, remove_stale_dirs

PathLike = Union[str, "os.PathLike[str]"]
Entry = Union[torch.Tensor, ResidualFactors]
PREFIX = "r2m-spill-"
# Growth of glibc's heap (bytes) past which it is asked to return its free pages to the OS.
HEAP_GROWTH_BYTES = 64 * 2**20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _glibc_heap() -> Optional[tuple[Any, Any]]:
    """(mallinfo2, malloc_trim) of glibc ≥ 2.33, or None (another C library: nothing to do)."""
    try:
        libc = ctypes.CDLL(None)
        mallinfo2, malloc_trim = libc.mallinfo2, libc.malloc_trim
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    malloc_trim.argtypes = [ctypes.c_size_t]
    return mallinfo2, malloc_trim


_HEAP = _glibc_heap()
_heap_mark: Optional[int] = None  # heap size at the last trim (or the first look)


def release_heap_slack(growth: int = HEAP_GROWTH_BYTES) -> bool:
    """Hand glibc's free heap pages back to the OS once its heap has grown by `growth` bytes.

    Why: a merge frees each layer's buffers and keeps a few small tensors per layer; glibc may carve
    those from the freed chunks, so that the next layer's buffers no longer fit there and the heap
    grows by about a buffer per layer, its free pages still counted in the RSS (measured: +3 MB per
    1024² layer, in some runs only: it depends on the address-space layout). malloc_trim(0) returns
    the whole free pages. Trimming only after growth keeps it off the steady state, where the pages
    freed by one layer are reused by the next and re-faulting them each time would cost ~15%."""
    global _heap_mark
    if _HEAP is None:
        return False
    mallinfo2, malloc_trim = _HEAP
    size = mallinfo2().arena
    if _heap_mark is None or size < _heap_mark:
        _heap_mark = size
    if size - _heap_mark <= growth:
        return False
    malloc_trim(0)
    _heap_mark = mallinfo2().arena
    return True


def check_spill_dir(directory: PathLike) -> Path:
    """The folder a spill may go into, or MergeInputError naming it (missing, not a folder, not writable)."""
    path = Path(directory)
    if not path.exists():
        raise MergeInputError(f"{directory}: spill folder does not exist")
    if not path.is_dir():
        raise MergeInputError(f"{directory}: spill folder is not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise MergeInputError(f"{directory}: spill folder is not writable")
    return path


class Spill:
    """A private temporary folder inside `directory` for the tensors one merge keeps between passes.

    ``store(kind)`` gives a mapping (layer name → tensor or ResidualFactors) whose entries live in it;
    tensors come back on `device`. Use as a context manager, or call ``close()``; counters:
    ``bytes_written`` (all files written), ``peak_bytes`` (most on disk at once)."""

    def __init__(self, directory: PathLike, device: Union[str, torch.device, None] = None):
        parent = check_spill_dir(directory)
        # A merge killed outright (SIGKILL, out of memory) cannot remove its spill: the folder is named
        # after its process, and the next spill into the same folder removes those whose process is gone.
        remove_stale_dirs(parent.absolute(), [PREFIX], f"merge spilling into {parent}")
        try:
            self.path = owned_temp_dir(parent, PREFIX)
        except OSError as exc:
            raise MergeInputError(f"{directory}: cannot create a spill folder there: {exc.strerror or exc}") from None
        # Removes the folder on close(), on garbage collection, or at interpreter exit, whichever is first.
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self.path), ignore_errors=True)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.bytes_written = 0
        self.bytes_on_disk = 0
        self.peak_bytes = 0
        self._counter = itertools.count()

    def store(self, kind: str) -> "SpillStore":
        return SpillStore(self, kind)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Delete the folder and everything in it (again: a no-op)."""
        self._finalizer()

    def report(self) -> dict[str, int]:
        """What goes into a merge report: bytes written, and the disk space the merge needed."""
        return {"spill_bytes": self.bytes_written, "spill_peak_bytes": self.peak_bytes}

    def __enter__(self) -> "Spill":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _new_file(self, kind: str) -> Path:
        if self.closed:
            raise RuntimeError(f"spill folder {self.path} is closed")
        return self.path / f"{kind}-{next(self._counter):06d}.safetensors"

    def _count(self, nbytes: int) -> None:
        self.bytes_on_disk += nbytes
        if nbytes > 0:
            self.bytes_written += nbytes
            self.peak_bytes = max(self.peak_bytes, self.bytes_on_disk)


class SpillStore(MutableMapping[str, Entry]):
    """Layer name → a tensor or a ResidualFactors, each entry one file of its Spill.

    A ResidualFactors' left and right factors go to disk; its kept σ² (N numbers) stay in memory, so
    ``kept_squares()`` answers without reading anything back. ``store[name]`` reads the entry onto
    the Spill's device; ``del store[name]`` deletes its file."""

    def __init__(self, spill: Spill, kind: str):
        self._spill = spill
        self._kind = kind
        self._entries: dict[str, tuple[Path, int, Optional[torch.Tensor]]] = {}  # path, bytes, kept σ²

    def __setitem__(self, name: str, value: Entry) -> None:
        if isinstance(value, torch.Tensor):
            items, kept = [("tensor", value)], None
        elif isinstance(value, ResidualFactors):
            items, kept = [("left", value.left), ("right", value.right)], value.kept_sq.detach().cpu()
        else:
            raise TypeError(f"spill: cannot store {type(value).__name__} for {name!r}")
        if name in self._entries:
            del self[name]
        path = self._spill._new_file(self._kind)
        try:
            nbytes = write_safetensors(path, items, sync=False)
        except BaseException as exc:
            path.unlink(missing_ok=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                free = free_bytes(self._spill.path)
                raise OutputError(exc.errno, (
                    f"{self._spill.path.parent}: no space left for the spill (--spill-dir) after "
                    f"{format_bytes(self._spill.bytes_on_disk)} of sketches and factors "
                    f"({'unknown' if free is None else format_bytes(free)} free); give a folder with more room, "
                    "or no --spill-dir to keep them in memory")) from None
            raise
        self._entries[name] = (path, nbytes, kept)
        self._spill._count(nbytes)
        release_heap_slack()  # once per layer in passes 1 and 2, where the heap would grow

    def __getitem__(self, name: str) -> Entry:
        path, _, kept = self._entries[name]
        file = SafetensorsFile(path)
        try:
            tensors = {key: file.get(key).to(self._spill.device) for key in file.entries}
        finally:
            file.close()
        if kept is None:
            return tensors["tensor"]
        return ResidualFactors(tensors["left"], tensors["right"], kept)

    def __delitem__(self, name: str) -> None:
        path, nbytes, _ = self._entries.pop(name)
        path.unlink(missing_ok=True)
        self._spill._count(-nbytes)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the entry
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:  # MutableMapping's default would read every entry before deleting it
        for name in list(self._entries):
            del self[name]

    def kept_squares(self) -> dict[str, torch.Tensor]:
        """Each ResidualFactors entry's kept σ², from memory."""
        return {name: kept for name, (_, _, kept) in self._entries.items() if kept is not None}


def open_spill(directory: Optional[PathLike], device: Union[str, torch.device, None] = None):
    """A context manager giving a Spill in `directory`, or None (keep everything in memory) when it is None."""
    return contextlib.nullcontext(None) if directory is None else Spill(directory, device)
