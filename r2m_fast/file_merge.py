"""A whole merge of checkpoints on disk into an output folder: readers → passes → writer.

:func:`merge_into_folder` is the one path from files to a finished folder: it opens the inputs
(r2m_fast.inputs.FileSource), opens the output transaction (r2m_fast.output.OutputFolder, disk space
checked before anything is read), streams the merge's tensors through a writer thread into the
shards, adds the index, config, model files and report, and commits. What runs the merge is a
callable, so R²M, the baselines (r2m_fast.api.merge_files) and the incremental merges that save
their state inside the folder (r2m_fast.incremental) all write through it. The distributed merge
writes through the same transaction from every rank (r2m_fast.distributed).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from r2m_fast.config import R2MConfig
from r2m_fast.inputs import FileSource
from r2m_fast.io import allowing_safe_globals
from r2m_fast.output import (
    DEFAULT_SHARD_SIZE, OutputFolder, ShardedSafetensorsWriter, check_output_apart, finish_folder, needed_bytes,
    output_layout, sigterm_cleans_up,
)
from r2m_fast.pipeline import BackgroundSink, fsync_output, resident_fits
from r2m_fast.result import MergeResult

PathLike = Union[str, "os.PathLike[str]"]
Sink = Callable[[str, torch.Tensor], None]
# run(source, sink, folder): the merge itself, its tensors into `sink`; `folder` is the temporary
# output folder, for files that belong beside the weights (an incremental state).
RunMerge = Callable[[FileSource, Sink, Path], MergeResult]


def merge_into_folder(
    base: PathLike,
    specialists: Sequence[PathLike],
    output: PathLike,
    config: R2MConfig,
    run: RunMerge,
    *,
    method: str = "r2m",
    options: Optional[Mapping[str, Any]] = None,
    prefix: Optional[str] = None,
    device: Optional[torch.device] = None,
    shard_size: Union[int, str] = DEFAULT_SHARD_SIZE,
    force: bool = False,
    resident: bool = False,
    allow_safe_globals: bool = False,
    copy_tokenizer: bool = True,
    tokenizer_source: Optional[PathLike] = None,
    **report_fields: Any,
) -> MergeResult:
    """Run `run` over the checkpoints and commit its output folder (see the module docstring).
    `resident`: keep the inputs mapped between passes when they fit (a merge reading them more than
    once). `report_fields` go into merge_report.json. Returns the result with the written report."""
    from r2m_fast.hf import resolve_model

    started = time.time()
    t0 = time.perf_counter()
    check_output_apart(output, [resolve_model(p) for p in (base, *specialists)])
    # Only ever widens what pickles may hold: a caller's allowing_safe_globals() block stays in force.
    admitting = allowing_safe_globals() if allow_safe_globals else contextlib.nullcontext()
    with sigterm_cleans_up(), admitting, FileSource(base, specialists, device=device, prefix=prefix) as source:
        source.resident = resident and resident_fits(source.input_bytes())
        open_seconds = time.perf_counter() - t0
        layout = output_layout(source.specs(), config.out_dtype)
        with OutputFolder(output, force=force, needed=needed_bytes(layout, shard_size)) as folder:
            assert folder.path is not None
            writer = ShardedSafetensorsWriter(folder.path, layout, shard_size=shard_size, sync=fsync_output(),
                                              on_error=folder.fail, in_place=True)
            with BackgroundSink(writer) as sink:  # writing overlaps computing the next tensor
                result = run(source, sink, folder.path)
            writer.close()
            result.report = finish_folder(
                folder, result, base=base, specialists=specialists, layout=layout, weight_map=writer.weight_map(),
                config=config, method=method, options=options, prefix=prefix, shard_size=shard_size, device=device,
                allow_safe_globals=allow_safe_globals, copy_tokenizer=copy_tokenizer,
                tokenizer_source=tokenizer_source, started=started, t0=t0, timings={"open_seconds": open_seconds},
                resident_inputs=source.resident, fsync=writer.sync, **report_fields,
            )
            folder.commit()
    return result
