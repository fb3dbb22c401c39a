"""Public entry points: r2m_fast.merge (in memory) and r2m_fast.merge_files (streamed, on disk)."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import torch

from r2m_fast.config import R2MConfig
from r2m_fast.plan import ModelLike
from r2m_fast.result import MergeResult
from r2m_fast.safety import check_device
from r2m_fast.sources import DictSource


def merge(
    base: ModelLike,
    specialists: Sequence[ModelLike],
    config: Optional[R2MConfig] = None,
    *,
    method: str = "r2m",
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = False,
    spill_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
    **overrides: Any,
) -> MergeResult:
    """Merge specialists fine-tuned from `base` into one model by R²M (or a baseline).

    Args:
        base: the pretrained model θ₀, a state dict (name → tensor) or an nn.Module.
        specialists: N ≥ 2 fine-tuned models of the same architecture (same names, shapes, dtypes);
            any iterable (a generator too).
        config: an R2MConfig. For ``method="r2m"`` keyword `overrides` replace its fields (e.g.
            ``rank_ratio=0.05``); for a baseline only its ``out_dtype`` and ``head_prefix`` apply.
        method: "r2m" (default), "average", "task_arithmetic", "ties" or "tsvm"
            (see r2m_fast.baselines).
        device: where to compute (default: the base tensors' device); results go back to it too.
            A device that cannot run here (``"cuda"`` without a usable GPU) raises
            r2m_fast.DeviceUnavailable before any work.
        progress: show a progress bar per pass.
        spill_dir: an existing, writable folder: R²M's sketches and residual factors wait between
            passes in a temporary folder created there (removed when the merge ends, also on
            errors) instead of in memory. Same result bit for bit; needs disk for about
            2·rank_ratio·N times one model's truncated weights in fp32 (all the factors, at the end
            of pass 2); the report gains ``spill_bytes`` (written in all, ≈ 3·rank_ratio·N×) and
            ``spill_peak_bytes``. None (default): keep them in memory.
        overrides: R2MConfig fields for "r2m"; the method's options otherwise
            (task_arithmetic: scaling=0.3; ties: density=0.2, scaling=1.0; tsvm: scaling=1.0;
            average, task_arithmetic and ties also weights=[w₁, …, w_N] and normalize, as
            mergekit's weight and normalize — see r2m_fast.baselines).
            An unknown name raises ValueError naming it.

    Returns:
        MergeResult with ``state_dict`` (same names, shapes and dtypes as the base unless
        ``out_dtype``) and ``report`` (for R²M: core_norm, eta, residual_norms, ranks, backend,
        seconds, …; for a baseline: method, options, seconds).
    """
    from r2m_fast.baselines import run_method

    device = check_device(device)
    config = config or R2MConfig()
    options: dict[str, Any] = {}
    if method == "r2m":
        config = config.replace(**overrides) if overrides else config
    else:
        options = overrides
    source = DictSource(base, list(specialists), device=device)
    return run_method(source, config, method=method, options=options, progress=progress, spill_dir=spill_dir)


def merge_files(
    base: Union[str, "os.PathLike[str]"],
    specialists: Sequence[Union[str, "os.PathLike[str]"]],
    output: Union[str, "os.PathLike[str]"],
    config: Optional[R2MConfig] = None,
    *,
    method: str = "r2m",
    options: Optional[dict[str, Any]] = None,
    prefix: Optional[str] = None,
    device: Optional[Union[str, torch.device]] = None,
    shard_size: Union[int, str] = "5GB",
    force: bool = False,
    progress: bool = False,
    spill_dir: Optional[Union[str, "os.PathLike[str]"]] = None,
    allow_safe_globals: bool = False,
    copy_tokenizer: bool = True,
    tokenizer_source: Optional[Union[str, "os.PathLike[str]"]] = None,
) -> MergeResult:
    """Merge checkpoints on disk into the folder `output`, streaming one layer at a time.

    Inputs are .safetensors files, Hugging Face style folders, or .pt/.pth/.bin state dicts (see
    r2m_fast.io), Hugging Face repo ids (``org/name``) found in the local cache (r2m_fast.hf), and,
    as specialists, PEFT LoRA adapter folders (materialized on the base one layer at a time;
    r2m_fast.lora). The output folder gets model.safetensors (or shards and an index), the config it
    ran with (merge_config.yaml), a report (merge_report.json), a README.md model card and, when the
    base is a Hugging Face model folder, its config.json (dtype set to the output's),
    generation_config.json and tokenizer files (from `tokenizer_source` instead when given; none
    with ``copy_tokenizer=False``), so that ``from_pretrained(output)`` loads it. It appears only
    when complete, and an existing one is replaced only with ``force=True``. The returned
    MergeResult has an empty state_dict (the tensors went to disk) and the report that was written.
    `spill_dir`: as for merge (keep R²M's between-pass tensors on disk there, so memory does not
    grow with the model). `options`: the method's (task_arithmetic: scaling, weights, normalize;
    ties: density, scaling, weights, normalize; average: weights, normalize; tsvm: scaling).
    Pickled inputs load with torch.load(weights_only=True); ``allow_safe_globals=True`` also accepts
    numpy scalars, dtypes and arrays and argparse.Namespace in them (nothing else). Before pass 1 the
    output's filesystem must have room for it, and temporary folders left beside `output` by killed
    merges (their process gone) are removed.
    """
    from r2m_fast.baselines import method_options, run_method
    from r2m_fast.file_merge import merge_into_folder
    from r2m_fast.hf import check_tokenizer_source, model_folder, resolve_model

    config = config or R2MConfig()
    specialists = list(specialists)  # a generator would be spent by the first look
    options = dict(options or {})
    method_options(method, options)
    device = check_device(device)
    if copy_tokenizer and tokenizer_source is not None:  # refused before the merge, not after it
        check_tokenizer_source(resolve_model(tokenizer_source), model_folder(resolve_model(base)), "tokenizer_source")
    if spill_dir is not None:
        from r2m_fast.spill import check_spill_dir

        check_spill_dir(spill_dir)  # before anything is read or written

    def run(source, sink, folder) -> MergeResult:
        return run_method(source, config, method=method, options=options, sink=sink, progress=progress,
                          spill_dir=spill_dir)

    # R²M reads its inputs three times: keep them mapped when they fit (a baseline reads them once);
    # a merge told to spill asked for bounded memory, so it streams.
    return merge_into_folder(
        base, specialists, output, config, run, method=method, options=options, prefix=prefix, device=device,
        shard_size=shard_size, force=force, resident=method == "r2m" and spill_dir is None,
        allow_safe_globals=allow_safe_globals, copy_tokenizer=copy_tokenizer, tokenizer_source=tokenizer_source,
    )
