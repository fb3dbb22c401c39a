"""Opening a merge's inputs: what each path is, and the LayerSource over files.

An input is a checkpoint file or folder (r2m_fast.io), a Hugging Face repo id from the local cache
(r2m_fast.hf), or, for a specialist, a PEFT LoRA adapter folder materialized on the base
(r2m_fast.lora). :func:`open_input` tells them apart; :class:`FileSource` opens the base and the
specialists through it and serves one layer of all of them at a time to the passes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from r2m_fast.hf import check_tokenizer_source, model_folder, resolve_model
from r2m_fast.io import Checkpoint, Specs, _nbytes, open_checkpoint
from r2m_fast.lora import LoraCheckpoint, check_adapter, is_adapter
from r2m_fast.plan import MergeInputError, check_compatible

PathLike = Union[str, os.PathLike]


def open_input(spec: PathLike, prefix: Optional[str], base: Optional[PathLike] = None):
    """Open one merge input lazily: a checkpoint file or folder, a repo id from the local cache, or
    (for a specialist, `base` given) a PEFT LoRA adapter folder materialized on `base` layer by layer."""
    path = resolve_model(spec)
    if is_adapter(path):
        if base is None:
            raise MergeInputError(f"{spec}: is a LoRA adapter; the base must be a full model")
        return LoraCheckpoint(path, base, prefix)
    return open_checkpoint(path, prefix)


def check_inputs(base: PathLike, specialists: Sequence[PathLike], tokenizer_source: Optional[PathLike] = None) -> None:
    """Refuse, before any work, inputs that cannot be read as given: repo ids not in the cache, a
    LoRA adapter as the base, adapters of an unsupported kind (MergeInputError naming file and key)."""
    if is_adapter(resolve_model(base)):
        raise MergeInputError(f"{base}: is a LoRA adapter; the base must be a full model")
    for spec in specialists:
        path = resolve_model(spec)
        if is_adapter(path):
            check_adapter(path)
    if tokenizer_source is not None:
        check_tokenizer_source(resolve_model(tokenizer_source), model_folder(resolve_model(base)), "tokenizer_source")


class FileSource:
    """A LayerSource over checkpoints on disk; labels are the input paths (for error messages).

    Safetensors are served as views of file mappings (no copy). Streamed (the default), a layer's
    pages leave the process when the next layer is loaded: the RSS holds about one layer of the N+1
    models (KEEP_MAPPED layers). ``resident=True`` keeps them mapped, so the later passes of a merge that reads its
    inputs several times (R²M: three) find them in place; only for inputs that fit in memory
    (see ``resident_fits``). The pages are clean file pages either way: the kernel can reclaim them.
    """

    # Layers whose pages stay mapped when streaming: those up to MAX_LAYER_WORKERS worker threads
    # compute on, the one queued and the one being loaded (see r2m_fast.pipeline.ordered_map).
    KEEP_MAPPED = 6

    def __init__(
        self,
        base: PathLike,
        specialists: Sequence[PathLike],
        device: Optional[Union[str, torch.device]] = None,
        prefix: Optional[str] = None,
        resident: bool = False,
    ):
        self.resident = resident
        self._loaded: list[str] = []  # the layers loaded last, newest last
        self.paths = [Path(base)] + [Path(s) for s in specialists]
        self.labels = [str(p) for p in self.paths]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._checkpoints: list[Checkpoint] = []
        try:
            for i, path in enumerate(self.paths):  # specialists may be LoRA adapters on the base
                self._checkpoints.append(open_input(path, prefix, base=self.paths[0] if i else None))
            specs = [c.specs for c in self._checkpoints]
            check_compatible(list(specs[0]), specs[0], specs[1:], self.labels[1:])
        except BaseException:
            self.close()
            raise
        self._specs = specs[0]

    def specs(self) -> Specs:
        return self._specs

    def load(self, name: str) -> list[torch.Tensor]:
        if name not in self._loaded:
            self._loaded.append(name)
            if len(self._loaded) > self.KEEP_MAPPED:
                old = self._loaded.pop(0)
                if not self.resident:
                    for c in self._checkpoints:
                        c.release(old)
        return [c.view(name).to(self.device) for c in self._checkpoints]

    def input_bytes(self) -> int:
        """Bytes of all N+1 inputs' tensors."""
        return len(self._checkpoints) * sum(_nbytes(shape, dtype) for shape, dtype in self._specs.values())

    def close(self) -> None:
        for c in self._checkpoints:
            c.close()

    def __enter__(self) -> "FileSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
