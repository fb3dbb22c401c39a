"""Incremental re-merge: save a merge *state* beside a merged checkpoint, later add or remove a specialist.

A state (``r2m_state/`` inside the merged output folder: every merged layer's Gram, every truncated
layer's per-model sketches, the inputs' fingerprints) is r2m_fast.merge_state's format. Here: the
pass 1 of an add and of a remove, handed to the one pass driver (engine.run_passes), and the API.

Why an add is exact: Ω of a layer depends only on the seed and the layer's name (engine.layer_seed), so
the saved Zⱼ are exactly what a from-scratch merge of N+1 models computes for the old models, and a
sketch is a per-model product (each model's rows of the batched GEMM do not depend on N). What an add
cannot avoid: the Gram row ⟨τ_new, τⱼ⟩ needs the old task vectors, and the residuals
Fᵢ = τᵢ − Σⱼ wⱼτⱼ change with w, so passes 2–3 read every model again. An add therefore reads the base
and all N+1 specialists three times, exactly like a full merge, and saves pass 1's N old sketches
(N of N+1 sketch GEMMs, the bulk of pass 1's arithmetic). Its pass 1 recomputes the whole (N+1)² Gram
in the same GEMM a fresh merge runs (a Gram is N²·P flops, cheap next to the sketches, and a row
computed on its own rounds differently): the result is bit-identical to a from-scratch merge on the
same backend, device and thread count, and the recomputed old block, compared with the saved one,
proves the old models are the ones the state was made from. A remove needs no pass 1 at all (drop a
row/column of each Gram and the model's sketches); it reads the base and the N−1 kept models twice.

API: merge_with_state / add_specialist / remove_specialist (in memory), merge_files_with_state /
add_specialist_files / remove_specialist_files (checkpoints on disk); save_state / load_state
(from r2m_fast.merge_state).
Command line: ``r2m-merge add|remove`` and ``r2m-merge --save-state`` (r2m_fast.cli).
"""

from __future__ import annotations

import functools
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from r2m_fast.backends import Backend, resolve_backend
from r2m_fast.config import R2MConfig
from r2m_fast.engine import FirstPass, MergeState, gram_pass, new_state, run_passes, sketch_matrix
from r2m_fast.merge_state import (
    STATE_DIR, STATE_JSON, IncrementalState, ModelRecord, check_fingerprint, dtype_name, fingerprint, load_state,
    save_state,
)
from r2m_fast.plan import MergeInputError, ModelLike, check_finite
from r2m_fast.result import MergeResult
from r2m_fast.safety import check_device
from r2m_fast.sources import DictSource, LayerSource

PathLike = Union[str, "os.PathLike[str]"]

# Saved and recomputed Grams may differ by GEMM rounding (another thread count, another GPU kernel
# split): an entry is "changed" when it moves by more than this fraction of √(GᵢᵢGⱼⱼ). A real change of a
# model moves its ‖τ‖² per layer by far more; a file change is caught first by the fingerprints.
GRAM_RTOL = 1e-4
# Options a re-merge may change: none of them enters pass 1 (the plan, Ω, the Grams and sketches).
REMERGE_OPTIONS = (
    "k_real", "alpha", "block_norm", "center", "real_blend_beta", "residual_scale", "power_iters", "backend",
    "out_dtype",
)

def _state_from_merge(
    merge_state: MergeState, config: R2MConfig, source: LayerSource, backend: Backend,
    base: ModelRecord, specialists: list[ModelRecord], prefix: Optional[str],
) -> IncrementalState:
    """Snapshot of pass 1's Grams and sketches (sketches moved to the CPU: a state outlives the merge)."""
    return IncrementalState(
        config=config,
        num_specialists=len(source.labels) - 1,
        range_finder_dtype=merge_state.range_finder_dtype,
        device_type=source.device.type,
        backend=backend.name,
        specs={layer.name: (layer.shape, layer.dtype) for layer in merge_state.plan},
        grams={name: g.cpu() for name, g in merge_state.grams.items()},
        base=base,
        specialists=specialists,
        prefix=prefix,
        _sketches={name: z.cpu() for name, z in merge_state.sketches.items()},
    )


# ----------------------------------------------------------------------------------------------
# Pass 1 of a re-merge
# ----------------------------------------------------------------------------------------------


def _config_for_remerge(state: IncrementalState, overrides: Mapping[str, Any]) -> R2MConfig:
    bad = sorted(set(overrides) - set(REMERGE_OPTIONS))
    if bad:
        raise ValueError(
            f"cannot change {', '.join(bad)} in a re-merge: the saved Grams and sketches depend on "
            f"{'it' if len(bad) == 1 else 'them'}; merge from scratch (changeable: {', '.join(REMERGE_OPTIONS)})"
        )
    return state.config.replace(**overrides) if overrides else state.config


def _check_source(source: LayerSource, state: IncrementalState, config: R2MConfig, backend: Backend) -> MergeState:
    merge_state = new_state(source, config, backend)
    specs = {layer.name: (layer.shape, layer.dtype) for layer in merge_state.plan}
    if specs != state.specs:
        changed = sorted(set(specs) ^ set(state.specs)) or [n for n in specs if specs[n] != state.specs[n]]
        raise MergeInputError(
            f"the base's tensors differ from the state's (first: {changed[0]!r}); the state belongs to another model"
        )
    if source.device.type != state.device_type:
        raise MergeInputError(
            f"the state's sketches were drawn on {state.device_type} and this re-merge runs on {source.device.type}: "
            f"the random test matrices differ between devices; run it on {state.device_type} or merge from scratch"
        )
    if merge_state.range_finder_dtype != state.range_finder_dtype:
        raise MergeInputError(
            f"the state's sketches were made at {dtype_name(state.range_finder_dtype)} and this machine's "
            f"range finder runs at {dtype_name(merge_state.range_finder_dtype)}; set range_finder_precision "
            "when merging, or merge from scratch"
        )
    return merge_state


def _check_gram_block(name: str, recomputed: torch.Tensor, saved: torch.Tensor, labels: Sequence[str]) -> None:
    """The old models' block of a recomputed Gram must be the saved one up to GEMM rounding."""
    diag = torch.diagonal(saved).clamp_min(0).sqrt()
    tol = GRAM_RTOL * torch.outer(diag, diag) + 1e-30
    bad = (recomputed - saved).abs() > tol
    if not bool(bad.any()):
        return
    # A changed model spoils its whole row and column: name the model whose ‖τ‖² moved, else the
    # row with the most changed entries; every diagonal moved means the base (or everything) changed.
    diag_bad = torch.diagonal(bad)
    if bool(diag_bad.all()) and saved.shape[0] > 1:
        i, who = 0, f"{labels[0]} (the base) or every specialist"
    else:
        i = int(diag_bad.nonzero()[0]) if bool(diag_bad.any()) else int(bad.sum(1).argmax())
        who = labels[1 + i]
    raise MergeInputError(
        f"{who}: tensor {name!r} differs from the model merged when the state was saved "
        f"(‖τ‖² {float(recomputed[i, i]):.6g}, saved {float(saved[i, i]):.6g}); pass the same base and "
        "specialists in the same order, or merge from scratch"
    )


@torch.no_grad()
def _add_pass(state: IncrementalState, source: LayerSource, merge_state: MergeState, config: R2MConfig,
              ops: Any, progress: bool) -> None:
    """Pass 1 of an add (with `state` bound, engine.run_passes' first_pass). Source models: base, the N
    old specialists, the new one (last).

    Per merged layer: the full (N+1)² Gram in one GEMM, exactly as gram_pass computes it, its old block
    checked against the saved Grams; per truncated layer: the new model's sketch only, the old ones
    read from the state."""
    N = state.num_specialists
    layers = [layer for layer in merge_state.plan if layer.merged]
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="pass 1/3: Gram rows and the new sketch", unit="layer", leave=False)
    for layer in layers:
        weights = [t.reshape(layer.matrix) for t in source.load(layer.name)]
        gram, _ = ops.gram_sketch(weights, None)
        gram = gram.detach().to(torch.float64).cpu()
        if not bool(torch.isfinite(gram).all()):
            check_finite(layer.name, source.load(layer.name), source.labels)
            raise MergeInputError(f"tensor {layer.name!r}: its Gram overflowed (task vectors too large for fp32)")
        _check_gram_block(layer.name, gram[:N, :N], state.grams[layer.name], source.labels)
        merge_state.grams[layer.name] = gram
        if layer.rank is not None:
            omega = sketch_matrix(layer, config, source.device, merge_state.range_finder_dtype)
            _, new = ops.gram_sketch([weights[0], weights[-1]], omega)
            old = state.sketch(layer.name).to(source.device)
            merge_state.sketches[layer.name] = torch.cat([old, new])


def _remove_pass(state: IncrementalState, index: int, source: LayerSource, merge_state: MergeState,
                 config: R2MConfig, ops: Any, progress: bool) -> None:
    """Pass 1 of a remove (with `state` and `index` bound, engine.run_passes' first_pass) reads no
    model: drop row and column `index` of each Gram and model `index`'s sketches."""
    keep = state.all_but(index)
    for name, gram in state.grams.items():
        merge_state.grams[name] = gram[keep][:, keep].contiguous()
    for name in state.sketch_names:
        merge_state.sketches[name] = state.sketch(name, keep).to(source.device)  # sketches live on the compute device


class _VerifyingSource:
    """A LayerSource that checks, at the first load of each merged layer, every kept model's ‖τ‖² against
    the saved Gram diagonal, so a remove (which has no pass 1) still refuses changed models before the
    output is committed."""

    def __init__(self, source: LayerSource, merged: set[str], diag: Mapping[str, torch.Tensor]):
        self._source = source
        self.device = source.device
        self.labels = source.labels
        self._merged = merged
        self._diag = diag
        self._checked: set[str] = set()

    def specs(self):
        return self._source.specs()

    def load(self, name: str) -> list[torch.Tensor]:
        tensors = self._source.load(name)
        if name in self._merged and name not in self._checked:
            base = tensors[0].float()
            now = torch.stack([torch.dot(t := (w.float() - base).reshape(-1), t) for w in tensors[1:]]).double().cpu()
            saved = self._diag[name]
            bad = ((now - saved).abs() > GRAM_RTOL * saved + 1e-30).nonzero().flatten().tolist()
            if bad:
                i = bad[0]
                raise MergeInputError(
                    f"{self.labels[1 + i]}: tensor {name!r} differs from the model merged when the state was saved "
                    f"(‖τ‖² {float(now[i]):.6g}, saved {float(saved[i]):.6g}); pass the same base and specialists, "
                    "or merge from scratch"
                )
            self._checked.add(name)
        return tensors


# ----------------------------------------------------------------------------------------------
# In memory
# ----------------------------------------------------------------------------------------------


def _device(device: Optional[Union[str, torch.device]]) -> Optional[torch.device]:
    return check_device(device)


@torch.no_grad()
def merge_with_state(
    base: ModelLike, specialists: Sequence[ModelLike], config: Optional[R2MConfig] = None, *,
    device: Optional[Union[str, torch.device]] = None, progress: bool = False,
) -> tuple[MergeResult, IncrementalState]:
    """r2m_fast.merge, also returning the state an add or remove starts from (bit-identical merge)."""
    config = config or R2MConfig()
    source = DictSource(base, specialists, device=_device(device))
    return _run_merge(source, config, None, progress, ModelRecord(), [ModelRecord() for _ in specialists])


@torch.no_grad()
def add_specialist(
    state: IncrementalState, base: ModelLike, old_specialists: Sequence[ModelLike], new_specialist: ModelLike, *,
    device: Optional[Union[str, torch.device]] = None, progress: bool = False, **overrides: Any,
) -> tuple[MergeResult, IncrementalState]:
    """Merge `old_specialists` + [`new_specialist`] reusing `state` (made from `base` + `old_specialists`).

    Equal to a from-scratch merge of all N+1 with the state's config; `overrides` may change the options
    that do not enter pass 1 (REMERGE_OPTIONS). Returns the merge and the state of the N+1 models."""
    _check_count(state, old_specialists)
    config = _config_for_remerge(state, overrides)
    source = DictSource(base, [*old_specialists, new_specialist], device=_device(device))
    result, new = _run_add(source, state, config, None, progress, ModelRecord(), [*state.specialists, ModelRecord()])
    return result, new


@torch.no_grad()
def remove_specialist(
    state: IncrementalState, base: ModelLike, old_specialists: Sequence[ModelLike], index: int, *,
    device: Optional[Union[str, torch.device]] = None, progress: bool = False, **overrides: Any,
) -> tuple[MergeResult, IncrementalState]:
    """Merge `old_specialists` without the one at `index` (it is not read), reusing `state`.

    Equal to a from-scratch merge of the N−1 others. Returns the merge and the state of the N−1 models."""
    _check_count(state, old_specialists)
    index = _check_index(state, index)
    config = _config_for_remerge(state, overrides)
    kept = [s for j, s in enumerate(old_specialists) if j != index]
    source = DictSource(base, kept, device=_device(device))
    records = [r for j, r in enumerate(state.specialists) if j != index]
    return _run_remove(source, state, index, config, None, progress, state.base, records)


def _check_count(state: IncrementalState, old: Sequence[Any]) -> None:
    if len(old) != state.num_specialists:
        raise MergeInputError(
            f"the state holds {state.num_specialists} specialists, {len(old)} were given; "
            "pass the specialists the state was made from, in the same order"
        )


def _check_index(state: IncrementalState, index: int) -> int:
    if isinstance(index, bool) or not isinstance(index, int) or not -state.num_specialists <= index < state.num_specialists:
        raise MergeInputError(f"index {index!r}: the state holds specialists 0..{state.num_specialists - 1}")
    if state.num_specialists - 1 < 2:
        raise MergeInputError(f"cannot remove from {state.num_specialists} specialists: R²M needs at least 2")
    return index % state.num_specialists


def _run_merge(source: LayerSource, config: R2MConfig, sink: Optional[Callable], progress: bool,
               base: ModelRecord, records: list[ModelRecord], prefix: Optional[str] = None,
               save_to: Optional[Path] = None, extra: Optional[Mapping[str, Any]] = None,
               ) -> tuple[MergeResult, Optional[IncrementalState]]:
    """A fresh merge (pass 1: engine.gram_pass) that keeps its state."""
    backend = resolve_backend(config.backend, source.device)
    start = time.perf_counter()
    return _run(source, new_state(source, config, backend), config, backend, gram_pass, sink, progress, base,
                records, prefix, save_to, extra, start)


def _run_add(source: LayerSource, state: IncrementalState, config: R2MConfig, sink: Optional[Callable],
             progress: bool, base: ModelRecord, records: list[ModelRecord], prefix: Optional[str] = None,
             save_to: Optional[Path] = None, extra: Optional[Mapping[str, Any]] = None,
             ) -> tuple[MergeResult, Optional[IncrementalState]]:
    backend = resolve_backend(config.backend, source.device)
    start = time.perf_counter()
    merge_state = _check_source(source, state, config, backend)
    result, new = _run(source, merge_state, config, backend, functools.partial(_add_pass, state), sink, progress,
                       base, records, prefix, save_to, extra, start)
    result.report["incremental"] = {"operation": "add", "reused_sketches_of": state.num_specialists}
    return result, new


def _run_remove(source: LayerSource, state: IncrementalState, index: int, config: R2MConfig, sink: Optional[Callable],
                progress: bool, base: ModelRecord, records: list[ModelRecord], prefix: Optional[str] = None,
                save_to: Optional[Path] = None, extra: Optional[Mapping[str, Any]] = None,
                ) -> tuple[MergeResult, Optional[IncrementalState]]:
    backend = resolve_backend(config.backend, source.device)
    start = time.perf_counter()
    merge_state = _check_source(source, state, config, backend)
    keep = state.all_but(index)
    merged = {layer.name for layer in merge_state.plan if layer.merged}
    diag = {name: torch.diagonal(g)[keep].clone() for name, g in state.grams.items()}
    verifying = _VerifyingSource(source, merged, diag)
    result, new = _run(verifying, merge_state, config, backend, functools.partial(_remove_pass, state, index), sink,
                       progress, base, records, prefix, save_to, extra, start)
    result.report["incremental"] = {"operation": "remove", "removed_index": index}
    return result, new


def _run(source: LayerSource, merge_state: MergeState, config: R2MConfig, backend: Backend, first_pass: FirstPass,
         sink: Optional[Callable], progress: bool, base: ModelRecord, records: list[ModelRecord],
         prefix: Optional[str], save_to: Optional[Path], extra: Optional[Mapping[str, Any]], start: float,
         ) -> tuple[MergeResult, Optional[IncrementalState]]:
    """engine.run_passes with `first_pass`, snapshotting the state once pass 1 is done: returned, or
    saved into `save_to` and not kept (on the CPU its sketches are the merge's own tensors, which pass 2
    frees layer by layer)."""
    snapshot: list[IncrementalState] = []

    def keep_state(merge_state: MergeState) -> None:
        state = _state_from_merge(merge_state, config, source, backend, base, records, prefix)
        if save_to is None:
            snapshot.append(state)
        else:
            save_state(state, save_to, extra)

    result = run_passes(source, merge_state, config, backend, first_pass=first_pass, sink=sink, progress=progress,
                        after_first_pass=keep_state, start=start)
    return result, (snapshot[0] if snapshot else None)


# ----------------------------------------------------------------------------------------------
# On disk
# ----------------------------------------------------------------------------------------------


def _records(base: PathLike, specialists: Sequence[PathLike]) -> tuple[ModelRecord, list[ModelRecord]]:
    from r2m_fast.hf import recorded_path

    return (ModelRecord(recorded_path(base), fingerprint(base)),
            [ModelRecord(recorded_path(s), fingerprint(s)) for s in specialists])


def _write_files(
    base: PathLike, specialists: Sequence[PathLike], output: PathLike, config: R2MConfig, *,
    run: Callable[..., tuple[MergeResult, Optional[IncrementalState]]], prefix: Optional[str], device: Any,
    shard_size: Union[int, str], force: bool, operation: str,
) -> MergeResult:
    """A merge into `output` (r2m_fast.file_merge.merge_into_folder: the output transaction every writer
    uses) whose state goes into output/r2m_state before the folder is moved into place: a merged
    folder always holds its state."""
    from r2m_fast.file_merge import merge_into_folder

    base_record, records = _records(base, specialists)

    def merge(source: LayerSource, sink: Callable, folder: Path) -> MergeResult:
        result, _ = run(source, sink=sink, base=base_record, records=records, prefix=prefix,
                        save_to=folder / STATE_DIR, extra={"output": os.path.abspath(output)})
        return result

    return merge_into_folder(base, specialists, output, config, merge, prefix=prefix, device=_device(device),
                             shard_size=shard_size, force=force, resident=True, state=STATE_DIR, operation=operation)


def merge_files_with_state(
    base: PathLike, specialists: Sequence[PathLike], output: PathLike, config: Optional[R2MConfig] = None, *,
    prefix: Optional[str] = None, device: Optional[Union[str, torch.device]] = None,
    shard_size: Union[int, str] = "5GB", force: bool = False, progress: bool = False,
) -> MergeResult:
    """r2m_fast.merge_files, also saving the merge state in output/r2m_state (bit-identical merge)."""
    config = config or R2MConfig()

    def run(source, sink, base, records, prefix, save_to, extra):
        return _run_merge(source, config, sink, progress, base, records, prefix, save_to, extra)

    return _write_files(base, specialists, output, config, run=run, prefix=prefix, device=device,
                        shard_size=shard_size, force=force, operation="merge")


def _resolve_inputs(state: IncrementalState, base: Optional[PathLike], old: Optional[Sequence[PathLike]],
                    skip: Optional[int] = None) -> tuple[PathLike, list[PathLike]]:
    """Base and old specialist paths (default: as recorded), fingerprint-checked; `skip` (the model a
    remove drops) is neither read nor checked, so it may be gone from disk."""
    base = base if base is not None else state.base.path
    old = list(old) if old is not None else [s.path for s in state.specialists]
    if base is None or any(p is None for j, p in enumerate(old) if j != skip):
        raise MergeInputError("the state was made in memory and records no paths: pass base and old_specialists")
    _check_count(state, old)
    check_fingerprint("base", base, state.base.fingerprint)
    for j, (path, record) in enumerate(zip(old, state.specialists)):
        if j != skip:
            check_fingerprint(f"specialist {j}", path, record.fingerprint)
    return base, old


def _default_output(state_dir: PathLike) -> Path:
    state_dir = Path(state_dir)
    if (state_dir / STATE_JSON).exists() and state_dir.name == STATE_DIR:
        return state_dir.parent
    return state_dir


def add_specialist_files(
    state_dir: PathLike, new_specialist: PathLike, *, base: Optional[PathLike] = None,
    old_specialists: Optional[Sequence[PathLike]] = None, output: Optional[PathLike] = None,
    device: Optional[Union[str, torch.device]] = None, shard_size: Union[int, str] = "5GB", force: bool = False,
    progress: bool = False, **overrides: Any,
) -> MergeResult:
    """Add a specialist to the merge whose state is `state_dir` (or the merged folder holding it).

    Base and old specialists default to the paths the state records; each is fingerprint-checked first.
    The merge of all N+1 and its new state go to `output` (default: the merged folder the state is in,
    replaced atomically)."""
    state = load_state(state_dir)
    base, old = _resolve_inputs(state, base, old_specialists)
    config = _config_for_remerge(state, overrides)
    if output is None:
        output, force = _default_output(state_dir), True

    def run(source, sink, base, records, prefix, save_to, extra):
        return _run_add(source, state, config, sink, progress, base, records, prefix, save_to, extra)

    return _write_files(base, [*old, new_specialist], output, config, run=run, prefix=state.prefix,
                        device=device, shard_size=shard_size, force=force, operation="add")


def remove_specialist_files(
    state_dir: PathLike, specialist: Union[int, PathLike], *, base: Optional[PathLike] = None,
    old_specialists: Optional[Sequence[PathLike]] = None, output: Optional[PathLike] = None,
    device: Optional[Union[str, torch.device]] = None, shard_size: Union[int, str] = "5GB", force: bool = False,
    progress: bool = False, **overrides: Any,
) -> MergeResult:
    """Remove a specialist (its index, or its path as recorded) from the merge whose state is `state_dir`.
    The removed model is not read; the others are read twice (passes 2–3)."""
    state = load_state(state_dir)
    recorded = [s.path for s in state.specialists]
    if isinstance(specialist, int) and not isinstance(specialist, bool):
        index = specialist
    else:
        path = os.path.abspath(specialist)
        if path not in recorded:
            raise MergeInputError(f"{specialist}: not a specialist of this state ({', '.join(map(str, recorded))})")
        index = recorded.index(path)
    index = _check_index(state, index)
    base, old = _resolve_inputs(state, base, old_specialists, skip=index)
    config = _config_for_remerge(state, overrides)
    if output is None:
        output, force = _default_output(state_dir), True
    kept = [p for j, p in enumerate(old) if j != index]

    def run(source, sink, base, records, prefix, save_to, extra):
        return _run_remove(source, state, index, config, sink, progress, base, records, prefix, save_to, extra)

    return _write_files(base, kept, output, config, run=run, prefix=state.prefix, device=device,
                        shard_size=shard_size, force=force, operation="remove")


if __name__ == "__main__":
    # `python -m r2m_fast.incremental {merge,add,remove} ...` is r2m-merge's (merge: with --save-state).
    from r2m_fast.cli import main

    argv = sys.argv[1:]
    sys.exit(main(["merge", "--save-state", *argv[1:]] if argv[:1] == ["merge"] else argv))
