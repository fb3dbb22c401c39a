"""The output folder of a merge: one transaction every writer goes through.

:class:`OutputFolder` is the transaction: a private temporary folder beside the target (named after
its process, so the next merge into the same place removes it if the process was killed), checked
for disk space before the first pass, filled, and moved into place whole with SIGINT/SIGTERM held
(never half-renamed; an output replaced with ``force`` goes back if the rename fails). Leaving its
``with`` block without ``commit()`` (an error, KeyboardInterrupt, SystemExit from a signal handler)
removes the temporary folder, so no partial output is ever visible at the target.

:class:`ShardedSafetensorsWriter` is the merge's sink inside it: each tensor goes straight into its
shard (the layout is known before the merge starts, so headers are written first and nothing is
buffered), shards named as Hugging Face names them. :func:`finish_folder` adds what makes the folder
a model and a record: the index, ``merge_config.yaml`` (feeding it back repeats the merge), the
model files (config, tokenizer, card: r2m_fast.hf) and ``merge_report.json``.

Every writer uses these: the file merge (r2m_fast.file_merge, for R²M and the baselines, with or
without an incremental state) and the distributed merge, whose ranks write their shards into one
rank-0 transaction (r2m_fast.distributed).
"""

from __future__ import annotations

import errno
import json
import math
import mmap
import os
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch

from r2m_fast.config import R2MConfig
from r2m_fast.io import (
    SAFETENSORS_INDEX, SAFETENSORS_SINGLE, _header_bytes, _nbytes, parse_size, write_tensor_data,
)
from r2m_fast.plan import MergeInputError
from r2m_fast.result import MergeResult
from r2m_fast.safety import (
    SIDE_FILES_BYTES, SIDE_FILES_BYTES_PER_TENSOR, OutputError, check_free_space, make_temp_dir, output_write_error,
    remove_stale_temps,
)

PathLike = Union[str, os.PathLike]
Layout = Sequence[tuple[str, tuple[int, ...], torch.dtype]]

DEFAULT_SHARD_SIZE = 5 * 10**9  # bytes, the Hugging Face default ("5GB")
CONFIG_FILE = "merge_config.yaml"
REPORT_FILE = "merge_report.json"
# Testing hook: seconds to sleep after each written tensor, so an interrupt can land mid-merge.
SINK_DELAY_ENV = "R2M_SINK_DELAY_S"


def output_layout(specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]], out_dtype: Optional[torch.dtype]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every output tensor in write order: floats in out_dtype when set."""
    return [
        (name, tuple(shape), out_dtype if out_dtype is not None and dtype.is_floating_point else dtype)
        for name, (shape, dtype) in specs.items()
    ]


def plan_shards(layout: Layout, shard_size: Union[int, str] = DEFAULT_SHARD_SIZE) -> list[list[tuple[str, tuple[int, ...], torch.dtype]]]:
    """`layout` cut into shards of at most `shard_size` bytes, in order; a tensor larger than that
    gets a shard of its own."""
    limit = parse_size(shard_size)
    shards: list[list] = [[]]
    size = 0
    for entry in layout:
        nbytes = _nbytes(entry[1], entry[2])
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """Hugging Face's names: ``model.safetensors`` alone, else ``model-0000i-of-0000n.safetensors``."""
    return [SAFETENSORS_SINGLE] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def needed_bytes(layout: Layout, shard_size: Union[int, str] = DEFAULT_SHARD_SIZE) -> int:
    """Disk space the finished folder takes: shards (headers included), index and side files."""
    shards = plan_shards(layout, shard_size)
    data = sum(len(_header_bytes(shard)) + sum(_nbytes(s, d) for _, s, d in shard) for shard in shards)
    index = 100 * len(layout) if len(shards) > 1 else 0  # ≈ one weight_map line per tensor
    return data + index + SIDE_FILES_BYTES + SIDE_FILES_BYTES_PER_TENSOR * len(layout)


def index_json(layout: Layout, weight_map: Mapping[str, str]) -> str:
    """``model.safetensors.index.json`` of a sharded output, tensors in layout order."""
    index = {
        # transformers 5 writes total_parameters beside total_size
        "metadata": {"total_parameters": sum(math.prod(s) for _, s, _ in layout),
                     "total_size": sum(_nbytes(s, d) for _, s, d in layout)},
        "weight_map": {name: weight_map[name] for name, _, _ in layout},
    }
    return json.dumps(index, indent=2) + "\n"


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the finished folder is moved into place (never half-renamed)."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (AttributeError, ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def sigterm_cleans_up() -> Iterator[None]:
    """Turn a default (fatal) SIGTERM into SystemExit(143) for the duration, so the transaction's
    cleanup runs; a handler the program installed itself (r2m-merge has one) is left alone."""
    import threading

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def umask() -> int:
    """The process umask, read without changing it where /proc says it (os.umask must set one)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class OutputFolder:
    """The transaction of one output folder (see the module docstring).

    ``with OutputFolder(output, force=..., needed=...) as folder:`` creates ``folder.path``, the
    temporary folder (after removing those of killed merges into the same output and checking that
    `needed` bytes are free); write into it, stage side files with ``add_text``/``add_file``, then
    ``commit()``. An OSError met while writing goes through ``fail(exc)``: the temporary folder goes
    first, then one line names the output (and, for a full disk, what it needs and what is free)."""

    def __init__(self, output: PathLike, *, force: bool = False, needed: int = 0):
        self.output = Path(output)
        self.force = force
        self.needed = needed
        self.path: Optional[Path] = None
        self._texts: dict[str, str] = {}
        self._copies: dict[str, Path] = {}

    def check_target(self) -> None:
        """Refuse an existing output unless forced (checked again just before the final rename)."""
        if self.output.exists() and not self.force:
            raise FileExistsError(f"{self.output}: output exists; pass --force (force=True) to replace it")
        if self.output.exists() and not self.output.is_dir():
            raise FileExistsError(f"{self.output}: exists and is not a folder")

    def __enter__(self) -> "OutputFolder":
        self.check_target()
        parent = self.output.absolute().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.output)  # before the space check: leftovers of killed merges count
            check_free_space(self.output, self.needed)
            self.path = make_temp_dir(parent, self.output.name)
        except OutputError:
            raise
        except OSError as exc:
            raise output_write_error(self.output, exc) from exc
        return self

    def fail(self, exc: OSError) -> OSError:
        """The error to raise for `exc` met while writing, after removing what was written."""
        self.abort()
        return output_write_error(self.output, exc, self.needed or None)

    def add_text(self, filename: str, text: str) -> None:
        """A side file (config, report) written into the folder at commit."""
        self._texts[filename] = text

    def add_file(self, filename: str, source: PathLike) -> None:
        """A copy of `source` (tokenizer, generation config) written into the folder at commit."""
        self._copies[filename] = Path(source)

    def commit(self) -> Path:
        """Write the staged side files and move the folder into place whole."""
        if self.path is None:
            raise RuntimeError(f"{self.output}: the output folder is not open (used outside its with-block)")
        try:
            for filename, text in self._texts.items():
                (self.path / filename).write_text(text)
            for filename, source in self._copies.items():
                shutil.copyfile(source, self.path / filename)
            # mkdtemp makes the folder 0700; a model folder gets the mode mkdir would give it (HF's 0755
            # under the usual umask).
            os.chmod(self.path, 0o777 & ~umask())
        except OSError as exc:
            raise self.fail(exc) from exc
        with _signals_deferred():
            self.check_target()
            trash = None
            try:
                if self.output.exists():
                    trash = make_temp_dir(self.path.parent, self.output.name, kind="old")
                    os.rename(self.output, trash / "old")
                os.rename(self.path, self.output)
            except OSError as exc:
                if trash is not None:
                    if (trash / "old").exists() and not self.output.exists():
                        os.rename(trash / "old", self.output)  # put the replaced output back
                    shutil.rmtree(trash, ignore_errors=True)
                raise self.fail(exc) from exc
            self.path = None
            if trash is not None:
                shutil.rmtree(trash, ignore_errors=True)
        return self.output

    def abort(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()


class _MappedShard:
    """One shard file allocated on the disk whole (posix_fallocate: a full disk fails here, not as a
    SIGBUS on a later write to the mapping) and mapped shared, its header written: each tensor is
    written at its place in the file through the mapping."""

    def __init__(self, path: Path, entries: Layout):
        header = _header_bytes(entries)
        self.places: dict[str, tuple[int, tuple[int, ...], torch.dtype, int]] = {}
        offset = len(header)
        for name, shape, dtype in entries:
            nbytes = _nbytes(shape, dtype)
            self.places[name] = (offset, tuple(shape), dtype, nbytes)
            offset += nbytes
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            os.posix_fallocate(self._fd, 0, offset)
            self._map = mmap.mmap(self._fd, offset)  # shared, read and write
        except BaseException:
            os.close(self._fd)
            raise
        self._map[: len(header)] = header

    def view(self, name: str) -> Optional[torch.Tensor]:
        """The tensor's place in the file (None for an empty tensor)."""
        offset, shape, dtype, nbytes = self.places[name]
        if not nbytes:
            return None
        return torch.frombuffer(self._map, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype).reshape(shape)

    def release(self, name: str) -> None:
        """Unmap the tensor's whole pages from this process: they stay in the page cache (dirty pages
        of a shared mapping are written back, not dropped), so the RSS holds no written output."""
        offset, _, _, nbytes = self.places[name]
        start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (offset + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self, sync: bool) -> None:
        try:
            if sync:
                self._map.flush()
                os.fsync(self._fd)
        finally:
            self.abandon()

    def abandon(self) -> None:
        try:
            self._map.close()
        except BufferError:  # a view of it still lives: the mapping goes with the last one
            pass
        if self._fd >= 0:
            fd, self._fd = self._fd, -1  # never closed twice: the number may be another file's by then
            try:
                os.close(fd)
            except OSError:
                pass


class ShardedSafetensorsWriter:
    """A merge sink writing sharded safetensors into `directory` (an OutputFolder's path, or a
    sub-folder of it): call it as ``writer(name, tensor)`` once per layout entry, in order, then
    ``close()``. `on_error(exc)` turns an OSError into the error to raise (OutputFolder.fail: the
    partial output goes first). Shard file names: `files` (default shard_names), `shards` the
    layout entries of each.

    ``in_place=True`` allocates every shard on the disk at once (a full disk fails before the merge
    starts) and maps it: each tensor is copied into its place in the file, and ``destination(name)``
    hands that place to a merge that can compute the tensor there, which then needs no memory of its
    own and no write() (at 1 B bf16: a fresh output tensor and its write() cost 2.9–3.4 s of CPU per
    1.85 GB here, the mapping 1.2–1.4 s). Where the file system allocates or maps no such file, the
    writer writes as without it."""

    def __init__(
        self,
        directory: PathLike,
        layout: Layout,
        shard_size: Union[int, str] = DEFAULT_SHARD_SIZE,
        sync: bool = True,
        on_error: Any = None,
        files: Optional[Sequence[str]] = None,
        in_place: bool = False,
    ):
        self.directory = Path(directory)
        self.layout = list(layout)
        self.sync = sync
        self.shards = plan_shards(self.layout, shard_size)
        self.files = list(files) if files is not None else shard_names(len(self.shards))
        self._on_error = on_error or (lambda exc: exc)
        self._pos = 0
        self._shard = -1
        self._handle = None
        self._delay = float(os.environ.get(SINK_DELAY_ENV, "0") or 0)
        self._mapped: Optional[list[_MappedShard]] = self._map_shards() if in_place else None
        self._where = {name: shard for shard in self._mapped or () for name in shard.places}

    def _map_shards(self) -> Optional[list[_MappedShard]]:
        mapped: list[_MappedShard] = []
        try:
            for entries, file in zip(self.shards, self.files):
                mapped.append(_MappedShard(self.directory / file, entries))
        except OSError as exc:
            for shard in mapped:
                shard.abandon()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._on_error(exc) from exc
            return None  # no fallocate or no shared mapping here: write() as usual
        return mapped

    @property
    def in_place(self) -> bool:
        """Whether the shards are mapped (tensors written in place)."""
        return self._mapped is not None

    def destination(self, name: str) -> Optional[torch.Tensor]:
        """Where tensor `name` goes in its shard, to compute it into and then hand to the writer
        (``writer(name, place)`` copies nothing); None when not in place or for an empty tensor."""
        shard = self._where.get(name)
        return None if shard is None else shard.view(name)

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self.layout):
            raise RuntimeError(f"writer: unexpected extra tensor {name!r}")
        want_name, shape, dtype = self.layout[self._pos]
        if name != want_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(
                f"writer: expected {want_name!r} {shape} {dtype}, got {name!r} {tuple(tensor.shape)} {tensor.dtype}"
            )
        if self._mapped is not None:
            self._write_in_place(name, tensor)
        else:
            self._write(name, tensor)
        self._pos += 1
        if self._delay:
            time.sleep(self._delay)

    def _write_in_place(self, name: str, tensor: torch.Tensor) -> None:
        shard = self._where[name]
        place = shard.view(name)
        if place is not None and not (tensor.device.type == "cpu" and tensor.data_ptr() == place.data_ptr()):
            place.copy_(tensor)
        shard.release(name)

    def _write(self, name: str, tensor: torch.Tensor) -> None:
        shard = self._shard_index(self._pos)
        try:
            if shard != self._shard:
                self._close_shard()
                self._shard = shard
                self._handle = open(self.directory / self.files[shard], "wb")
                self._handle.write(_header_bytes(self.shards[shard]))
            write_tensor_data(self._handle, tensor)
        except OSError as exc:
            self._drop_handle()
            raise self._on_error(exc) from exc

    def _shard_index(self, pos: int) -> int:
        for i, shard in enumerate(self.shards):
            if pos < len(shard):
                return i
            pos -= len(shard)
        raise IndexError(pos)

    def _close_shard(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            if self.sync:
                os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def _drop_handle(self) -> None:
        for shard in self._mapped or ():
            shard.abandon()
        if self._handle is not None:
            try:
                self._handle.close()
            except OSError:  # its buffer could not be flushed (a full disk): the file goes anyway
                pass
            self._handle = None

    def close(self) -> None:
        """Flush the last shard; every layout entry must have been written."""
        if self._pos != len(self.layout):
            self._drop_handle()
            raise RuntimeError(f"writer: {len(self.layout) - self._pos} tensor(s) never written")
        try:
            if self._mapped is not None:
                for shard in self._mapped:
                    shard.close(self.sync)
            else:
                self._close_shard()
        except OSError as exc:
            self._drop_handle()
            raise self._on_error(exc) from exc

    def weight_map(self) -> dict[str, str]:
        """Tensor name → the file holding it."""
        return {name: file for shard, file in zip(self.shards, self.files) for name, _, _ in shard}


def check_output_apart(output: PathLike, inputs: Sequence[PathLike]) -> None:
    """Refuse an output folder that is, or contains, an input: replacing it would modify inputs."""
    out = Path(output).resolve()
    for path in inputs:
        p = Path(path).resolve()
        if p == out or out in p.parents:
            raise MergeInputError(f"{output}: output would replace input {path}; choose another folder")


def versions() -> dict[str, str]:
    import platform
    import sys

    import safetensors

    import r2m_fast

    return {
        "r2m_fast": r2m_fast.__version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }


def output_report(
    result: MergeResult, base: PathLike, specialists: Sequence[PathLike], output: PathLike, prefix: Optional[str],
    files: Sequence[str], started: float, t0: float, timings: Optional[dict] = None, **fields: Any,
) -> dict:
    """The report written beside a merged checkpoint: the merge's own report, `fields`, where it read
    and wrote, versions, and timings (`timings` first, then the merge's and the total since `t0`)."""
    report = dict(result.report)
    report.update(fields)
    report.update({
        "inputs": {"base": str(base), "specialists": [str(s) for s in specialists]},
        "prefix": prefix,
        "output": str(output),
        "files": list(files) + ([SAFETENSORS_INDEX] if len(files) > 1 else []),
        "versions": versions(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "timings": {**(timings or {}),
                    "merge_seconds": result.report.get("seconds"),
                    "pass_seconds": result.report.get("pass_seconds"),
                    "total_seconds": time.perf_counter() - t0},
    })
    return report


def run_config_dict(
    base: PathLike, specialists: Sequence[PathLike], output: PathLike, config: R2MConfig, method: str,
    options: Mapping[str, Any], prefix: Optional[str], shard_size: Union[int, str], device: Any,
    allow_safe_globals: bool = False,
) -> dict[str, Any]:
    """The YAML the merge ran with: feeding it back to r2m-merge repeats the merge. k_real is
    recorded as used: clamped to the number of specialists."""
    from r2m_fast.hf import recorded_path

    out: dict[str, Any] = {
        "base": recorded_path(base),
        "specialists": [recorded_path(s) for s in specialists],
        "output": os.path.abspath(output),
        "method": method,
    }
    out.update({k: _option_value(v) for k, v in options.items()})
    if prefix is not None:
        out["prefix"] = prefix
    out["shard_size"] = parse_size(shard_size)
    if device is not None:
        out["device"] = str(device)
    if allow_safe_globals:
        out["allow_safe_globals"] = True
    out.update(config.to_dict())
    out["k_real"] = min(config.k_real, len(specialists))
    return out


def _option_value(value: Any) -> Any:
    """A method option as YAML writes it: numbers as floats, per-model lists as lists of floats."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return float(value)


def finish_folder(
    folder: OutputFolder, result: MergeResult, *, base: PathLike, specialists: Sequence[PathLike],
    layout: Layout, weight_map: Mapping[str, str], config: R2MConfig, method: str = "r2m",
    options: Optional[Mapping[str, Any]] = None, prefix: Optional[str] = None,
    shard_size: Union[int, str] = DEFAULT_SHARD_SIZE, device: Any = None, allow_safe_globals: bool = False,
    copy_tokenizer: bool = True, tokenizer_source: Optional[PathLike] = None, started: float, t0: float,
    timings: Optional[dict] = None, run_config_extra: Optional[Mapping[str, Any]] = None, **report_fields: Any,
) -> dict:
    """Stage everything beside the weights of a finished merge in `folder`: the index (when
    sharded), merge_config.yaml, the model files and merge_report.json. Returns the report."""
    import yaml

    from r2m_fast.hf import add_model_files, recorded_path

    options = dict(options or {})
    files = list(dict.fromkeys(weight_map[name] for name, _, _ in layout)) or shard_names(1)
    if len(files) > 1:
        folder.add_text(SAFETENSORS_INDEX, index_json(layout, weight_map))
    report = output_report(result, base, specialists, folder.output, prefix, files, started, t0, timings=timings,
                           method=method, seed=config.seed, **report_fields)
    run_cfg = run_config_dict(base, specialists, folder.output, config, method, options, prefix, shard_size, device,
                              allow_safe_globals=allow_safe_globals)
    if not copy_tokenizer or tokenizer_source is not None:
        run_cfg["copy_tokenizer"] = copy_tokenizer
        run_cfg["tokenizer_source"] = None if tokenizer_source is None else recorded_path(tokenizer_source)
    run_cfg.update(run_config_extra or {})
    run_yaml = yaml.safe_dump(run_cfg, sort_keys=False)
    folder.add_text(CONFIG_FILE, run_yaml)
    report["model_files"] = add_model_files(folder, base, specialists, layout, method, options, run_yaml,
                                            prefix=prefix, copy_tokenizer=copy_tokenizer,
                                            tokenizer_source=tokenizer_source)
    folder.add_text(REPORT_FILE, json.dumps(report, indent=2, default=str) + "\n")
    return report
