"""Checkpoint reading for streamed merges: lazy LayerSources over files, and the safetensors format.

Inputs: a ``.safetensors`` file, a Hugging Face style folder (``model.safetensors``, or shards plus
``model.safetensors.index.json``; ``pytorch_model.bin`` likewise), or a ``.pt``/``.pth``/``.bin``
state dict. A merge holds one parameter of the N+1 models at a time.

Why safetensors are read with positional reads and not kept memory-mapped: pages of a mapping count
in the process RSS once touched and stay mapped until the mapping goes, so a merge that walks a
mapped model three times ends with the whole model resident. Reading each tensor's bytes into a
fresh buffer (one ``readinto`` per tensor, offsets from the header) costs the same copy a mapped
read followed by ``clone`` would, and the buffer is freed as soon as the layer is done: peak RSS
stays near one layer × (N+2). PyTorch pickles have no such index, so they are ``torch.load``-ed with
``mmap=True`` and re-opened once the bytes touched pass a budget, which drops the mapping.

The safetensors encoding (write_safetensors, write_tensor_data) is here too: the output writer
(r2m_fast.output), the spill and the incremental state all write through it.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch

from r2m_fast.plan import MergeInputError
from r2m_fast.safety import blocked_globals, known_safe_globals, refused_pickle_message

PathLike = Union[str, os.PathLike]
Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# Keys under which training scripts commonly wrap the state dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "ema", "params")
# Bytes a mmapped .pt checkpoint may serve before it is re-opened so that touched pages are unmapped.
PICKLE_REMAP_BYTES = 256 * 2**20

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {dtype: name for name, dtype in _ST_DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the safetensors library refuses larger headers too


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------


class SafetensorsFile:
    """One .safetensors file: the header parsed and validated on open, tensors read on demand."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self._file = _open_for_reading(self.path)
        self._map: Optional[mmap.mmap] = None
        try:
            self.entries = self._read_header()
        except BaseException:
            self.close()
            raise

    def _read_header(self) -> dict[str, tuple[tuple[int, ...], torch.dtype, int, int]]:
        size = os.fstat(self._file.fileno()).st_size
        raw = self._file.read(8)
        if len(raw) < 8:
            raise MergeInputError(f"{self.path}: truncated or not a safetensors file ({size} bytes)")
        header_len = int.from_bytes(raw, "little")
        if header_len > _MAX_HEADER or 8 + header_len > size:
            raise MergeInputError(
                f"{self.path}: corrupt or truncated safetensors file (header of {header_len} bytes, file of {size})"
            )
        try:
            header = json.loads(self._file.read(header_len))
            if not isinstance(header, dict):
                raise ValueError("header is not an object")
        except (ValueError, UnicodeDecodeError) as exc:
            raise MergeInputError(f"{self.path}: corrupt safetensors header ({exc})") from None
        data_start = 8 + header_len
        data_size = size - data_start
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype = _ST_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise MergeInputError(f"{self.path}: tensor {name!r} has a corrupt header entry {info!r}") from None
            if end - begin != _nbytes(shape, dtype) or begin < 0:
                raise MergeInputError(
                    f"{self.path}: tensor {name!r}: header offsets {begin}..{end} do not fit shape {shape} {dtype}"
                )
            if end > data_size:
                raise MergeInputError(
                    f"{self.path}: truncated: tensor {name!r} needs {end} data bytes, the file holds {data_size}"
                )
            entries[name] = (shape, dtype, data_start + begin, end - begin)
        return entries

    def get(self, name: str) -> torch.Tensor:
        shape, dtype, offset, nbytes = self.entries[name]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            view = memoryview(buf.numpy())
            if self._file is None:
                self._file = _open_for_reading(self.path)
            try:
                self._file.seek(offset)
                got = self._file.readinto(view)
            except OSError as exc:
                raise MergeInputError(f"{self.path}: tensor {name!r}: read failed: {exc}") from None
            if got != nbytes:
                raise MergeInputError(f"{self.path}: truncated: tensor {name!r} read {got} of {nbytes} bytes")
        return buf.view(dtype).reshape(shape)

    def view(self, name: str) -> torch.Tensor:
        """The tensor as a zero-copy view of a private (copy-on-write) mapping of the file: no copy
        and no fresh memory to fault in, the two costs of ``get``. Writing to it never reaches the
        file. Its pages count in the RSS once touched; ``release`` drops them (the view stays valid
        and re-reads them from the page cache if used again)."""
        shape, dtype, offset, nbytes = self.entries[name]
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        if self._map is None:
            handle = _open_for_reading(self.path)
            try:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
            except (OSError, ValueError) as exc:
                raise MergeInputError(f"{self.path}: cannot map for reading: {exc}") from None
            finally:
                handle.close()
            # Pass order follows the file order: ask the kernel to read ahead.
            self._map.madvise(mmap.MADV_SEQUENTIAL)
        self._map.madvise(mmap.MADV_WILLNEED, *_page_range(offset, nbytes, len(self._map)))
        flat = torch.frombuffer(self._map, dtype=torch.uint8, count=nbytes, offset=offset)
        return flat.view(dtype).reshape(shape)

    def release(self, name: str) -> None:
        """Drop the mapped pages of one tensor from this process (the page cache keeps them)."""
        _, _, offset, nbytes = self.entries[name]
        if self._map is not None and nbytes:
            self._map.madvise(mmap.MADV_DONTNEED, *_page_range(offset, nbytes, len(self._map)))

    def close(self) -> None:
        """Close the file handle and the mapping (a later get or view re-opens them). A mapping that
        views still use is left to go with the last of them."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass
            self._map = None


def _page_range(offset: int, nbytes: int, limit: int) -> tuple[int, int]:
    """(start, length) of the whole pages covering bytes offset..offset+nbytes (madvise wants a
    page-aligned start)."""
    start = offset - offset % mmap.PAGESIZE
    return start, min(offset + nbytes, limit) - start


def _open_for_reading(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise MergeInputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise MergeInputError(f"{path}: is a folder, expected a file") from None
    except OSError as exc:
        raise MergeInputError(f"{path}: cannot read: {exc.strerror or exc}") from None


class Checkpoint:
    """A model on disk: ``specs`` (name → (shape, dtype)) and ``get(name)`` → a CPU tensor it owns.

    ``prefix`` keeps only the keys under it and strips it (``"backbone."`` turns
    ``backbone.blocks.0.w`` into ``blocks.0.w``); the file and tensor names in errors are the
    original ones.
    """

    path: Path
    specs: Specs

    def __init__(self, path: Path, tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]], prefix: Optional[str]):
        self.path = path
        self._keys: dict[str, str] = {}
        for key in tensors:
            if prefix is None:
                self._keys[key] = key
            elif key.startswith(prefix) and len(key) > len(prefix):
                self._keys[key[len(prefix):]] = key
        if prefix is not None and not self._keys:
            sample = ", ".join(repr(k) for k in list(tensors)[:3])
            raise MergeInputError(f"{path}: no tensor name starts with prefix {prefix!r} (names look like {sample})")
        if not self._keys:
            raise MergeInputError(f"{path}: holds no tensors")
        self.specs = {name: tensors[key] for name, key in self._keys.items()}

    def key(self, name: str) -> str:
        return self._keys[name]

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError  # every subclass reads its own format

    def view(self, name: str) -> torch.Tensor:
        """``get`` without the copy where the format allows (a read-only use; see SafetensorsFile.view)."""
        return self.get(name)

    def release(self, name: str) -> None:
        """Done with ``view(name)``: let its pages leave the process."""

    def close(self) -> None:
        pass


class SafetensorsCheckpoint(Checkpoint):
    """One file or several shards (name → shard from the index)."""

    # Shards kept open at once per checkpoint: a merge reads in the base's order, which follows the
    # shards, while N+1 models of hundreds of shards each would run into the open-file limit.
    MAX_OPEN_SHARDS = 4

    def __init__(self, path: Path, shard_of: Mapping[str, Path], prefix: Optional[str]):
        self._shards: dict[Path, SafetensorsFile] = {}
        self._open_order: list[Path] = []
        try:
            tensors, self._shard_of = {}, {}
            for shard in dict.fromkeys(shard_of.values()):
                st = SafetensorsFile(shard)
                st.close()  # header checked; data is read later
                self._shards[shard] = st
                for key, (shape, dtype, _, _) in st.entries.items():
                    if shard_of.get(key) == shard:
                        tensors[key] = (shape, dtype)
                        self._shard_of[key] = shard
            missing = [k for k, s in shard_of.items() if k not in tensors]
            if missing:
                raise MergeInputError(
                    f"{path}: tensor {missing[0]!r} is listed in the index under {shard_of[missing[0]].name} "
                    f"but that shard does not hold it ({len(missing)} missing)"
                )
            super().__init__(path, tensors, prefix)
        except BaseException:
            self.close()
            raise

    def get(self, name: str) -> torch.Tensor:
        key = self.key(name)
        shard = self._shard_of[key]
        if shard in self._open_order:
            self._open_order.remove(shard)
        self._open_order.append(shard)
        while len(self._open_order) > self.MAX_OPEN_SHARDS:
            self._shards[self._open_order.pop(0)].close()
        return self._shards[shard].get(key)

    def view(self, name: str) -> torch.Tensor:
        key = self.key(name)
        return self._shards[self._shard_of[key]].view(key)  # a mapping holds no file handle open

    def release(self, name: str) -> None:
        key = self.key(name)
        self._shards[self._shard_of[key]].release(key)

    def close(self) -> None:
        for st in self._shards.values():
            st.close()
        self._open_order.clear()


class PickleCheckpoint(Checkpoint):
    """A torch.save'd state dict (possibly wrapped, possibly sharded with a .bin index). Inside
    ``allowing_safe_globals()`` it also accepts the known-safe globals of r2m_fast.safety."""

    def __init__(self, path: Path, files: Sequence[Path], prefix: Optional[str], remap_bytes: int = PICKLE_REMAP_BYTES):
        self._files = list(files)
        self._allow_safe_globals = _ALLOW_SAFE_GLOBALS.get()  # a later re-open loads the same way
        self._remap_bytes = remap_bytes
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}
        self._touched: dict[Path, int] = {}
        self._mmapped: dict[Path, bool] = {}
        tensors, self._file_of = {}, {}
        for file in self._files:
            for key, value in self._load(file).items():
                tensors[key] = (tuple(value.shape), value.dtype)
                self._file_of[key] = file
        super().__init__(path, tensors, prefix)

    def _load(self, file: Path) -> dict[str, torch.Tensor]:
        if file in self._loaded:
            return self._loaded[file]
        if not file.exists():
            raise MergeInputError(f"{file}: no such file")
        obj, mmapped = _torch_load(file, self._allow_safe_globals)
        self._loaded[file] = _find_state_dict(obj, file)
        self._mmapped[file] = mmapped
        self._touched[file] = 0
        return self._loaded[file]

    def get(self, name: str) -> torch.Tensor:
        key = self.key(name)
        file = self._file_of[key]
        tensor = self._load(file)[key]
        out = tensor.clone()  # own the bytes: the caller must not keep the mapping alive
        self._touched[file] += out.nbytes
        if self._touched[file] > self._remap_bytes and (self._mmapped[file] or len(self._files) > 1):
            # Dropping every reference to a mapped checkpoint unmaps it, and the touched pages leave
            # the RSS with it; the next get re-opens it (a pickle parse, no tensor data read).
            del self._loaded[file]
        return out

    def close(self) -> None:
        self._loaded.clear()


# Set by allowing_safe_globals(): pickles opened meanwhile accept r2m_fast.safety.known_safe_globals().
_ALLOW_SAFE_GLOBALS: ContextVar[bool] = ContextVar("r2m_allow_safe_globals", default=False)


@contextmanager
def allowing_safe_globals(allow: bool = True) -> Iterator[None]:
    """Pickled checkpoints opened inside this block may hold numpy scalars, dtypes and arrays and
    argparse.Namespace objects (torch.load(weights_only=True) with exactly those added); never any
    other global."""
    token = _ALLOW_SAFE_GLOBALS.set(bool(allow))
    try:
        yield
    finally:
        _ALLOW_SAFE_GLOBALS.reset(token)


def _torch_load(file: Path, allow_safe_globals: bool = False) -> tuple[Any, bool]:
    allowed = known_safe_globals() if allow_safe_globals else []

    def load(mmap: bool) -> Any:
        # torch's own warnings about a checkpoint (deprecated numpy paths, storage types) are not
        # actionable here: the file loads or the error below says what to do.
        with warnings.catch_warnings(), torch.serialization.safe_globals(allowed):
            warnings.simplefilter("ignore")
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)

    try:
        return load(mmap=True), True
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise _unreadable(file, exc, allow_safe_globals) from None
    except Exception as exc:  # pickle/zip errors come in many types
        raise _unreadable(file, exc, allow_safe_globals) from None
    # The legacy (non-zip) format cannot be mapped: it is read whole.
    try:
        return load(mmap=False), False
    except Exception as exc:
        raise _unreadable(file, exc, allow_safe_globals) from None


def _unreadable(file: Path, exc: BaseException, allow_safe_globals: bool) -> MergeInputError:
    text = str(exc)
    if "weights only load failed" in text.lower():  # torch's weights-only unpickler stopped
        blocked = blocked_globals(file, exc)
        if blocked:
            return MergeInputError(refused_pickle_message(file, blocked, allow_safe_globals))
        # Not a global it refused but bytes it cannot parse: say that, not torch's whole advice.
        reason = text.partition("WeightsUnpickler error:")[2].strip().splitlines()
        if reason:
            return MergeInputError(f"{file}: not a readable PyTorch checkpoint (unpickling: {reason[0]})")
    return MergeInputError(f"{file}: not a readable PyTorch checkpoint ({_first_line(exc)})")


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()  # no terminal colour codes
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _find_state_dict(obj: Any, file: Path, depth: int = 0) -> dict[str, torch.Tensor]:
    """The name → tensor mapping in a loaded checkpoint, unwrapping {"state_dict": …}-style wrappers."""
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if depth < 3:
            for key in WRAPPER_KEYS:
                if isinstance(obj.get(key), Mapping):
                    return _find_state_dict(obj[key], file, depth + 1)
        keys = ", ".join(repr(k) for k in list(obj)[:8])
        bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
        raise MergeInputError(
            f"{file}: no state dict found: entry {bad!r} is a {type(obj.get(bad)).__name__}, not a tensor, and "
            f"none of the wrapper keys {WRAPPER_KEYS} holds one (keys: {keys})"
        )
    raise MergeInputError(f"{file}: holds a {type(obj).__name__}, not a state dict")


def open_checkpoint(path: PathLike, prefix: Optional[str] = None) -> Checkpoint:
    """Open a checkpoint lazily (headers only): a file or a Hugging Face style folder.

    Raises MergeInputError naming the path for unreadable paths, unknown formats and corrupt files.
    """
    path = Path(path)
    if not path.exists():
        raise MergeInputError(f"{path}: no such file or folder")
    if not os.access(path, os.R_OK):
        raise MergeInputError(f"{path}: permission denied")
    if path.is_dir():
        return _open_folder(path, prefix)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return SafetensorsCheckpoint(path, _single_shard(path), prefix)
    if suffix in PICKLE_SUFFIXES:
        return PickleCheckpoint(path, [path], prefix)
    if suffix == ".json" and path.name.endswith(".index.json"):
        return _open_index(path, prefix)
    raise MergeInputError(
        f"{path}: unknown checkpoint format {suffix or '(no suffix)'!r}; expected .safetensors, "
        f"{', '.join(PICKLE_SUFFIXES)}, or a folder with {SAFETENSORS_SINGLE} / {SAFETENSORS_INDEX}"
    )


def _single_shard(path: Path) -> dict[str, Path]:
    st = SafetensorsFile(path)
    try:
        return {key: path for key in st.entries}
    finally:
        st.close()


def _open_folder(path: Path, prefix: Optional[str]) -> Checkpoint:
    for name in (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, BIN_INDEX, BIN_SINGLE):
        if (path / name).exists():
            return open_checkpoint(path / name, prefix)
    candidates = sorted(p for p in path.iterdir() if p.suffix == ".safetensors")
    if len(candidates) == 1:
        return open_checkpoint(candidates[0], prefix)
    raise MergeInputError(
        f"{path}: folder holds neither {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} nor {BIN_INDEX}"
        + (f" (and {len(candidates)} other .safetensors files)" if candidates else "")
    )


def _open_index(path: Path, prefix: Optional[str]) -> Checkpoint:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise ValueError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MergeInputError(f"{path}: corrupt index ({_first_line(exc)})") from None
    shard_of = {key: path.parent / file for key, file in weight_map.items()}
    for key, shard in shard_of.items():
        if not shard.exists():
            raise MergeInputError(f"{path}: tensor {key!r} is in shard {shard.name}, which does not exist")
    if path.name.startswith("model.safetensors") or all(s.suffix == ".safetensors" for s in shard_of.values()):
        return SafetensorsCheckpoint(path, shard_of, prefix)
    return PickleCheckpoint(path, list(dict.fromkeys(shard_of.values())), prefix)


def load_state_dict(path: PathLike, prefix: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint in memory (for small models, tests and the in-memory API)."""
    ckpt = open_checkpoint(path, prefix)
    try:
        return {name: ckpt.get(name) for name in ckpt.specs}
    finally:
        ckpt.close()


# ----------------------------------------------------------------------------------------------
# The safetensors format, written
# ----------------------------------------------------------------------------------------------


def parse_size(value: Union[int, float, str]) -> int:
    """Bytes from 5000000, "5GB" (10⁹), "500MiB" (2²⁰), "1.5G"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        size = int(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)b?\s*", str(value).lower())
        if not match:
            raise ValueError(f"shard_size: cannot read {value!r}; use bytes or e.g. '5GB', '500MB', '2GiB'")
        number, unit, binary = match.groups()
        base = 1024 if binary else 1000
        size = int(float(number) * base ** " kmgt".index(unit or " "))
    if size <= 0:
        raise ValueError(f"shard_size: must be positive, got {value!r}")
    return size


def _header_bytes(entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data 8-byte aligned, as the safetensors library writes it
    return len(raw).to_bytes(8, "little") + raw


def write_tensor_data(handle: Any, tensor: torch.Tensor) -> None:
    """The raw bytes of `tensor` at the handle's position, in C order; any dtype (bf16 goes out as its
    bit pattern, so it reads back bit for bit). A CUDA tensor is copied to the host first."""
    data = tensor.detach().to("cpu").contiguous().reshape(-1)
    if data.numel():
        handle.write(memoryview(data.view(torch.uint8).numpy()))


def write_safetensors(path: PathLike, items: Sequence[tuple[str, torch.Tensor]], sync: bool = True) -> int:
    """A .safetensors file written tensor by tensor, straight from each tensor's memory (views of one
    tensor need no copies, which safetensors.torch.save_file would demand for tensors sharing
    storage); read it back with SafetensorsFile. `sync` flushes it to the disk before returning.
    Returns the file's size in bytes."""
    header = _header_bytes([(key, tuple(tensor.shape), tensor.dtype) for key, tensor in items])
    with open(path, "wb") as handle:
        handle.write(header)
        for _, tensor in items:
            write_tensor_data(handle, tensor)
        handle.flush()
        if sync:
            os.fsync(handle.fileno())
        return handle.tell()
