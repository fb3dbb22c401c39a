"""The saved state of an R²M merge: its format on disk and the fingerprints of its inputs.

What a state holds (``r2m_state/`` inside the merged output folder):

    state.json          config, seed, N, range-finder dtype, device type, the base and specialist paths
                        with fingerprints (size + sampled blake2b of each weight file), layer list
    state.safetensors   gram::<layer>          (N, N) fp64 Gram Gˡ = Aˡ Aˡᵀ of every merged layer
                        sketch::<layer>::<j>   (m, s) fp32 sketch Zⱼ = τⱼ Ω of every truncated layer

An incremental re-merge (r2m_fast.incremental) starts from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from r2m_fast.config import R2MConfig
from r2m_fast.plan import DECOMPOSED, MergeInputError, build_plan

PathLike = Union[str, "os.PathLike[str]"]

STATE_DIR = "r2m_state"
STATE_JSON = "state.json"
STATE_TENSORS = "state.safetensors"
STATE_FORMAT = "r2m_fast.merge_state"
STATE_VERSION = 1
# Weight files a checkpoint folder is fingerprinted by (config.json and the like may change freely).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
FINGERPRINT_SAMPLES = 16
FINGERPRINT_CHUNK = 64 * 1024


# ----------------------------------------------------------------------------------------------
# Fingerprints
# ----------------------------------------------------------------------------------------------


def fingerprint(path: PathLike) -> dict[str, Any]:
    """Sizes and a sampled blake2b of a checkpoint's weight files: cheap (≤ 1 MiB read per file), so
    an add can refuse changed inputs before reading them. A change that keeps the size and misses
    every sample is still caught by the Gram check during the re-merge (see GRAM_RTOL)."""
    from r2m_fast.hf import resolve_model

    path = resolve_model(path)  # a repo id: its cached snapshot
    if path.is_dir():
        files = sorted(
            p for p in path.iterdir()
            if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json"))
        )
    else:
        files = [path]
    out = {}
    for file in files:
        size = file.stat().st_size
        digest = hashlib.blake2b(digest_size=16)
        with open(file, "rb") as handle:
            positions = sorted({
                min(max(size - FINGERPRINT_CHUNK, 0), (size * k) // FINGERPRINT_SAMPLES)
                for k in range(FINGERPRINT_SAMPLES)
            } | {max(size - FINGERPRINT_CHUNK, 0)})
            for pos in positions:
                handle.seek(pos)
                digest.update(handle.read(FINGERPRINT_CHUNK))
        # A single-file checkpoint is keyed by role, not name, so a renamed copy still matches.
        out[file.name if path.is_dir() else "checkpoint file"] = {"size": size, "blake2b_sampled": digest.hexdigest()}
    return out


def check_fingerprint(label: str, path: PathLike, saved: Optional[Mapping[str, Any]]) -> None:
    """MergeInputError when `path` is not the checkpoint the state was saved from."""
    if saved is None:
        return
    if not Path(path).exists():
        raise MergeInputError(f"{label} {path}: no such file or folder")
    now = fingerprint(path)
    for name in sorted(set(now) | set(saved)):
        if name not in now or name not in saved:
            raise MergeInputError(
                f"{label} {path}: weight files differ from the state's ({name} is "
                f"{'new' if name in now else 'missing'}); the models must be those merged when the state was saved"
            )
        if now[name] != saved[name]:
            what = "size" if now[name]["size"] != saved[name]["size"] else "content"
            raise MergeInputError(
                f"{label} {path}: {name} has changed since the state was saved ({what} differs); "
                "the models must be those merged when the state was saved, or merge from scratch"
            )


# ----------------------------------------------------------------------------------------------
# The state
# ----------------------------------------------------------------------------------------------


@dataclass
class ModelRecord:
    """One input of the merge a state belongs to: its path (None in memory) and fingerprint."""

    path: Optional[str] = None
    fingerprint: Optional[dict[str, Any]] = None


@dataclass
class IncrementalState:
    """What a re-merge reuses: per-layer Grams and per-model sketches of N specialists.

    ``sketch(name, models)`` gives the (len(models), m, s) fp32 sketches of a truncated layer; a state
    loaded from disk reads them on demand, one layer at a time."""

    config: R2MConfig
    num_specialists: int
    range_finder_dtype: torch.dtype
    device_type: str
    backend: str
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]]
    grams: dict[str, torch.Tensor]                      # (N, N) fp64 CPU
    base: ModelRecord = field(default_factory=ModelRecord)
    specialists: list[ModelRecord] = field(default_factory=list)
    prefix: Optional[str] = None
    _sketches: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)   # in memory: (N, m, s)
    _reader: Optional[Callable[[str, int], torch.Tensor]] = field(default=None, repr=False)

    def sketch(self, name: str, models: Optional[Sequence[int]] = None) -> torch.Tensor:
        models = list(range(self.num_specialists)) if models is None else list(models)
        if self._reader is None:
            return self._sketches[name][models]
        return torch.stack([self._reader(name, j) for j in models])

    def all_but(self, index: int) -> list[int]:
        """The specialists a remove of `index` keeps, in order."""
        return [j for j in range(self.num_specialists) if j != index]

    @property
    def sketch_names(self) -> list[str]:
        plan = new_plan(self.specs, self.config)
        return [layer.name for layer in plan if layer.rank is not None and layer.kind == DECOMPOSED]


def new_plan(specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]], config: R2MConfig):
    return build_plan(specs, config)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_state(state: IncrementalState, directory: PathLike, extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write `state` into `directory` (created; replaced files are overwritten): state.json + state.safetensors."""
    from r2m_fast.io import write_safetensors
    from r2m_fast.output import versions

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    items: list[tuple[str, torch.Tensor]] = [(f"gram::{name}", g) for name, g in state.grams.items()]
    for name in state.sketch_names:
        z = state.sketch(name)
        items.extend((f"sketch::{name}::{j}", z[j]) for j in range(state.num_specialists))
    write_safetensors(directory / STATE_TENSORS, items)
    meta = {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "num_specialists": state.num_specialists,
        "config": state.config.to_dict(),
        "seed": state.config.seed,
        "range_finder_dtype": dtype_name(state.range_finder_dtype),
        "device_type": state.device_type,
        "backend": state.backend,
        "prefix": state.prefix,
        "base": vars(state.base),
        "specialists": [vars(s) for s in state.specialists],
        "layers": {name: {"shape": list(shape), "dtype": dtype_name(dtype)} for name, (shape, dtype) in state.specs.items()},
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions(),
    }
    meta.update(extra or {})
    (directory / STATE_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load_state(directory: PathLike) -> IncrementalState:
    """Open a saved state: the JSON and Grams now, sketches on demand. Accepts the state folder or
    the merged output folder that holds it."""
    from r2m_fast.io import SafetensorsFile

    directory = Path(directory)
    if not (directory / STATE_JSON).exists() and (directory / STATE_DIR / STATE_JSON).exists():
        directory = directory / STATE_DIR
    try:
        meta = json.loads((directory / STATE_JSON).read_text())
    except FileNotFoundError:
        raise MergeInputError(f"{directory}: no merge state here ({STATE_JSON} missing)") from None
    except ValueError as exc:
        raise MergeInputError(f"{directory / STATE_JSON}: corrupt state ({exc})") from None
    if meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION:
        raise MergeInputError(
            f"{directory}: not a version-{STATE_VERSION} r2m_fast merge state "
            f"(format {meta.get('format')!r}, version {meta.get('version')!r})"
        )
    from r2m_fast.config import parse_dtype

    cfg = dict(meta["config"])
    cfg["exclude"] = tuple(cfg["exclude"])
    config = R2MConfig(**cfg)
    specs = {name: (tuple(info["shape"]), getattr(torch, info["dtype"])) for name, info in meta["layers"].items()}
    tensors = SafetensorsFile(directory / STATE_TENSORS)
    N = int(meta["num_specialists"])
    grams = {key.removeprefix("gram::"): tensors.get(key) for key in tensors.entries if key.startswith("gram::")}
    for name, g in grams.items():
        if tuple(g.shape) != (N, N):
            raise MergeInputError(f"{directory}: Gram of {name!r} is {tuple(g.shape)}, expected ({N}, {N})")
    state = IncrementalState(
        config=config,
        num_specialists=N,
        range_finder_dtype=parse_dtype(meta["range_finder_dtype"]),
        device_type=meta["device_type"],
        backend=meta["backend"],
        specs=specs,
        grams=grams,
        base=ModelRecord(**meta["base"]),
        specialists=[ModelRecord(**s) for s in meta["specialists"]],
        prefix=meta.get("prefix"),
        _reader=lambda name, j: tensors.get(f"sketch::{name}::{j}"),
    )
    missing = [n for n in state.sketch_names if f"sketch::{n}::0" not in tensors.entries]
    if missing:
        raise MergeInputError(f"{directory}: state lacks the sketches of {missing[0]!r} ({len(missing)} layers)")
    return state
