"""Checks that fail a merge early and clearly, and leftovers it cleans up.

- :func:`check_device`: a device that cannot run here (``cuda`` without a usable GPU) is refused
  with one line before anything is read.
- The output's temporary folders carry their owner (host and process id) in their name, so the
  next merge into the same output removes those whose process is gone (a merge killed by SIGKILL
  or a power cut cannot clean up after itself): :func:`make_temp_dir`, :func:`remove_stale_temps`.
- :func:`check_free_space` refuses an output that does not fit before pass 1, and
  :func:`output_write_error` turns ENOSPC/EACCES met while writing into one line that names the
  output folder, what it needs and what is free.
- :data:`KNOWN_SAFE_GLOBALS`: the only pickle globals ``allow_safe_globals`` lets
  ``torch.load(weights_only=True)`` accept (numpy scalars, dtypes and arrays; argparse.Namespace),
  and :func:`refused_pickle_message` for a checkpoint that needs more.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

logger = logging.getLogger("r2m_fast")


class DeviceUnavailable(RuntimeError):
    """The requested device cannot run on this machine (no usable GPU, index out of range, ...)."""


class OutputError(OSError):
    """The output folder cannot be written (no space, no permission); the message names the folder."""

    def __init__(self, code: int, message: str):
        super().__init__(code, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# ----------------------------------------------------------------------------------------------
# Devices
# ----------------------------------------------------------------------------------------------


def check_device(device: Union[str, torch.device, None]) -> Optional[torch.device]:
    """`device` as a torch.device, or DeviceUnavailable/ValueError with one line saying why it
    cannot be used here. Nothing is allocated on the device (a CUDA context is not created)."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: unknown device {str(device)!r}; use cpu, cuda or cuda:INDEX") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch was built without CUDA" if torch.version.cuda is None
                   else "torch.cuda.is_available() is False: no GPU visible to this process, or its driver cannot be used")
            raise DeviceUnavailable(f"device {str(device)!r}: no usable CUDA GPU here ({why}); use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise DeviceUnavailable(f"device {str(device)!r}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    elif dev.type != "cpu":
        module = getattr(torch, dev.type, None) if dev.type != "mps" else getattr(torch.backends, "mps", None)
        available = getattr(module, "is_available", None)
        if available is None or not available():
            raise DeviceUnavailable(f"device {str(device)!r}: not available here; use cpu or cuda")
    return dev


# ----------------------------------------------------------------------------------------------
# Temporary folders beside the output, and the leftovers of killed merges
# ----------------------------------------------------------------------------------------------

# .<output name>.tmp-<host>-<pid>-<random> (and .old- for a replaced output on its way out).
_TEMP_KINDS = ("tmp", "old")
_OWNER = re.compile(r"(?P<host>[A-Za-z0-9_]+)-(?P<pid>[0-9]+)-[A-Za-z0-9_]+")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname() or "host")


def owned_temp_dir(parent: Union[str, os.PathLike], prefix: str) -> Path:
    """A new folder ``<prefix><host>-<pid>-XXXXXXXX`` in `parent`: the name says which process owns
    it, so :func:`remove_stale_dirs` can tell a leftover from a merge still running."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{_host()}-{os.getpid()}-", dir=parent))


def make_temp_dir(parent: Union[str, os.PathLike], name: str, kind: str = "tmp") -> Path:
    """The output's temporary folder ``.<name>.<kind>-<host>-<pid>-XXXXXXXX`` in `parent`."""
    return owned_temp_dir(parent, f".{name}.{kind}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except OSError:
        return True
    try:  # a killed process not yet reaped by its parent (a zombie) holds its pid but runs nothing
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def remove_stale_temps(output: Union[str, os.PathLike]) -> list[tuple[Path, int]]:
    """Remove the temporary folders of merges into `output` whose process is gone (see
    remove_stale_dirs); returns them with their sizes."""
    output = Path(output).absolute()
    return remove_stale_dirs(output.parent, [f".{output.name}.{kind}-" for kind in _TEMP_KINDS],
                             f"merge into {output}")


def remove_stale_dirs(parent: Path, prefixes: Sequence[str], user: str) -> list[tuple[Path, int]]:
    """Remove the folders in `parent` named ``<prefix><host>-<pid>-…`` (owned_temp_dir) whose process
    is gone (same host, pid no longer running); returns them with their sizes. Folders of running
    merges, of other hosts, or without an owner in their name (older versions) are left, with one
    warning line naming each; `user` says whose folders these are ("merge into <output>")."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    removed: list[tuple[Path, int]] = []
    host = _host()
    for entry in entries:
        prefix = next((p for p in prefixes if entry.name.startswith(p)), None)
        if prefix is None or not entry.is_dir():
            continue
        owner = _OWNER.fullmatch(entry.name[len(prefix):])
        if owner is None:
            logger.warning("r2m_fast: %s was left by an interrupted merge of an older version; remove it "
                           "if no %s is running", entry, user)
            continue
        pid = int(owner["pid"])
        if owner["host"] != host:
            logger.warning("r2m_fast: %s belongs to a merge on host %s (pid %d); remove it if that merge "
                           "is not running", entry, owner["host"], pid)
            continue
        if pid == os.getpid() or _alive(pid):
            logger.warning("r2m_fast: %s belongs to a running %s (pid %d)", entry, user, pid)
            continue
        size = _folder_bytes(entry)
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append((entry, size))
            logger.warning("r2m_fast: removed %s (%s), left by a merge whose process %d is gone",
                           entry, format_bytes(size), pid)
    return removed


# ----------------------------------------------------------------------------------------------
# Disk space and write errors
# ----------------------------------------------------------------------------------------------

# Room for merge_config.yaml and merge_report.json beyond the shards and the index: a fixed part and
# a part per tensor (the report lists ranks and kinds per layer; measured ≈ 150 B per tensor).
SIDE_FILES_BYTES = 16 * 1024
SIDE_FILES_BYTES_PER_TENSOR = 256


def format_bytes(n: float) -> str:
    """Three significant figures ("1.02 GB", "21.0 MB", "512 KB"): one decimal of a GB hid the
    difference between the process now and the dry run's peak on a small merge."""
    if n < 999.5:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 999.5 or unit == "TB":
            break
    decimals = 2 if n < 9.995 else 1 if n < 99.95 else 0
    return f"{n:.{decimals}f} {unit}"


def free_bytes(folder: Union[str, os.PathLike]) -> Optional[int]:
    """Free bytes for this user on the filesystem of `folder` (or its nearest existing parent)."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def check_free_space(output: Union[str, os.PathLike], needed: int) -> None:
    """OutputError unless the filesystem that will hold `output` has `needed` bytes free (an
    output replaced with --force stays until the new one is complete, so it does not count)."""
    parent = Path(output).absolute().parent
    free = free_bytes(parent)
    if free is not None and free < needed:
        raise OutputError(
            errno.ENOSPC,
            f"{output}: not enough disk space in {parent}: the output needs {format_bytes(needed)}, "
            f"{format_bytes(free)} free",
        )


def output_write_error(output: Union[str, os.PathLike], exc: OSError, needed: Optional[int] = None) -> OSError:
    """One line for an OSError met while writing `output` (its temporary folder already removed):
    names the output folder, not the temporary one; for a full disk, the size needed and free."""
    parent = Path(output).absolute().parent
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(parent)
        need = f"the output needs {format_bytes(needed)}, " if needed is not None else ""
        have = f"{format_bytes(free)} free" if free is not None else "free space unknown"
        return OutputError(exc.errno, f"{output}: no space left on the device of {parent} while writing the "
                                      f"output ({need}{have} after removing the partial output)")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(exc.errno, f"{output}: cannot write the output folder: {exc.strerror or 'permission denied'} "
                                      f"in {parent}")
    return OutputError(exc.errno or errno.EIO, f"{output}: cannot write the output folder: {exc.strerror or exc}")


# ----------------------------------------------------------------------------------------------
# Pickled checkpoints
# ----------------------------------------------------------------------------------------------


def known_safe_globals() -> list[Any]:
    """Globals that build plain data and run no code of the checkpoint's choosing: numpy scalars,
    dtypes and arrays, and argparse.Namespace (training scripts save their arguments). Entries are
    objects or (object, "module.name") for the names numpy 1 pickled them under."""
    import argparse

    allowed: list[Any] = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:
        return allowed
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    allowed += [np.ndarray, np.dtype]
    allowed += [getattr(np.dtypes, n) for n in getattr(np.dtypes, "__all__", [])] if hasattr(np, "dtypes") else []
    for fn in (multiarray.scalar, multiarray._reconstruct):
        allowed.append(fn)
        # numpy 2 moved numpy.core to numpy._core; checkpoints saved with numpy 1 name the old path.
        for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed.append((fn, f"{module}.{fn.__name__}"))
    return allowed


def _global_name(entry: Any) -> str:
    if isinstance(entry, tuple):
        return entry[1]
    return f"{entry.__module__}.{entry.__qualname__}"


def known_safe_global_names() -> set[str]:
    return {_global_name(g) for g in known_safe_globals()}


_UNSUPPORTED = re.compile(r"GLOBAL (\S+) was not an allowed global")


def blocked_globals(file: Union[str, os.PathLike], exc: BaseException) -> list[str]:
    """The globals `file` needs beyond torch's weights-only allowlist: every one torch can list
    (zip checkpoints), else the one named in the error."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = list(torch.serialization.get_unsafe_globals_in_checkpoint(file))
    except Exception:  # legacy (non-zip) files cannot be scanned
        found = []
    return found or list(dict.fromkeys(_UNSUPPORTED.findall(str(exc))))


def refused_pickle_message(file: Union[str, os.PathLike], blocked: Sequence[str], allowed: bool) -> str:
    """One plain line for a pickle torch.load(weights_only=True) refused: which globals, and what to do."""
    safe = known_safe_global_names()
    unsafe = [g for g in blocked if g not in safe]
    if allowed and unsafe:
        blocked = unsafe  # the known-safe ones were accepted
    names = ", ".join(blocked) if blocked else "an object that is not a tensor or plain container"
    head = f"{file}: refused to unpickle {names} (only tensors and plain containers load safely)"
    if blocked and not unsafe and not allowed:
        return (f"{head}; pass --allow-safe-globals (allow_safe_globals=True) to accept numpy scalars, dtypes "
                f"and arrays and argparse.Namespace, or convert the checkpoint to .safetensors")
    what = ", ".join(unsafe) if unsafe else names
    return (f"{head}; {what} could run code while loading, so r2m_fast never allows it: convert the checkpoint "
            f"to .safetensors where you trust it (torch.load(weights_only=False), then "
            f"safetensors.torch.save_file of its state dict)")
