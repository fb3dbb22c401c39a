"""PEFT LoRA adapters as specialists: each adapted weight materialized on the base, one layer at a time.

A LoRA fine-tune ships as a folder with ``adapter_config.json`` and ``adapter_model.safetensors``
(or ``adapter_model.bin``). As a specialist it is the model PEFT's ``merge_and_unload()`` would
produce, θ = θ₀ + s·B·A with s = lora_alpha/r (lora_alpha/√r with ``use_rslora``), per-module r
and alpha from ``rank_pattern``/``alpha_pattern`` (matched as PEFT matches them), transposed for
``fan_in_fan_out`` (GPT-2's Conv1D) and for embeddings. Tensors the adapter stores whole
(``modules_to_save``, saved embedding layers, trained biases) replace the base's. Every other
tensor is the base's.

Nothing is merged ahead: ``get(name)`` reads the base tensor and that module's two factors and
returns the sum, rounded as PEFT's merge_and_unload() rounds it, so a merge of adapters equals the
merge of their ``merge_and_unload()`` models and holds one layer at a time like any other input.

Refused with a MergeInputError naming the adapter file and the key: other PEFT types (``peft_type``),
DoRA (``use_dora``), LoRA biases (``lora_bias``), convolution LoRA, and options that change the
architecture (``layer_replication``, ``trainable_token_indices``, ``target_parameters``).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch

from r2m_fast.hf import read_json_object, resolve_model
from r2m_fast.io import Checkpoint, PickleCheckpoint, SafetensorsCheckpoint, _single_shard, open_checkpoint
from r2m_fast.plan import MergeInputError

PathLike = Union[str, os.PathLike]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# PEFT's saved keys start with the PeftModel's own wrapper names.
PEFT_PREFIX = "base_model.model."
_FACTORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
# Config keys that, when set (truthy), describe an adapter this reader cannot materialize exactly.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters (use_dora) rescale the merged weight by a learned magnitude",
    "lora_bias": "LoRA biases (lora_bias)",
    "layer_replication": "layer_replication changes the architecture",
    "trainable_token_indices": "trainable_token_indices",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "use_qalora": "QA-LoRA (use_qalora)",
}


def is_adapter(path: PathLike) -> bool:
    """True for a folder holding a PEFT adapter (adapter_config.json) and no full model weights
    (a folder with both is read as the full model it holds)."""
    from r2m_fast.io import BIN_INDEX, BIN_SINGLE, SAFETENSORS_INDEX, SAFETENSORS_SINGLE

    path = Path(path)
    return (path.is_dir() and (path / ADAPTER_CONFIG).is_file()
            and not any((path / name).exists() for name in (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, BIN_INDEX, BIN_SINGLE)))


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key k with re.match(rf"(.*\\.)?({k})$", module)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """adapter_config.json, checked for what this reader supports (MergeInputError naming the key)."""
    path = folder / ADAPTER_CONFIG
    config = read_json_object(path, "adapter config")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise MergeInputError(f"{path}: peft_type {config.get('peft_type')!r}: only LoRA adapters are supported")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise MergeInputError(f"{path}: {key}: {what} is not supported")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise MergeInputError(f"{path}: {key} must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise MergeInputError(f"{path}: {key} must be a mapping of module patterns to numbers")
    return config


def _open_weights(folder: Path) -> Checkpoint:
    for name in ADAPTER_WEIGHTS:
        path = folder / name
        if path.is_file():
            if name.endswith(".safetensors"):
                return SafetensorsCheckpoint(path, _single_shard(path), None)
            return PickleCheckpoint(path, [path], None)  # weights_only=True, as every pickle here
    raise MergeInputError(f"{folder}: a LoRA adapter without {' or '.join(ADAPTER_WEIGHTS)}")


def _parse_key(key: str, file: Path) -> tuple[str, str, Optional[str]]:
    """('lora', module, factor) or ('full', tensor name in the base, None) for one saved key."""
    parts = key.removeprefix(PEFT_PREFIX).split(".")
    for i, part in enumerate(parts):
        if part in _FACTORS:
            rest = parts[i + 1:]
            if rest and rest[-1] == "bias":
                raise MergeInputError(f"{file}: tensor {key!r}: LoRA biases (lora_bias) are not supported")
            return "lora", ".".join(parts[:i]), part
        if part.startswith("lora_") or part.startswith("hada_") or part.startswith("lokr_"):
            what = "DoRA (use_dora)" if part == "lora_magnitude_vector" else f"{part!r} tensors"
            raise MergeInputError(f"{file}: tensor {key!r}: {what} not supported")
    # Whole tensors: a module saved for training (modules_to_save.<adapter>), a saved embedding
    # layer (base_layer), or a bias; their name in the base lacks PEFT's wrapper segments.
    out, skip = [], False
    for i, part in enumerate(parts):
        if skip:
            skip = False
        elif part == "modules_to_save":
            skip = True  # the adapter name follows
        elif part not in ("base_layer", "original_module"):
            out.append(part)
    return "full", ".".join(out), None


class LoraCheckpoint(Checkpoint):
    """A LoRA adapter folder as the full model it makes with the base (see the module docstring).

    ``specs`` are the base's (under `prefix` as usual); ``get(name)`` materializes one tensor."""

    def __init__(self, folder: PathLike, base: PathLike, prefix: Optional[str] = None):
        self.path = Path(folder)
        config = read_adapter_config(self.path)
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
        self._weights = _open_weights(self.path)
        self.base: Optional[Checkpoint] = None
        try:
            self.base = open_checkpoint(resolve_model(base), prefix)  # a full model (inputs.open_input checks)
            self.specs = dict(self.base.specs)
            file = self._weights.path
            names = {self.base.key(name): name for name in self.specs}  # original key → merge name
            self._full: dict[str, str] = {}           # merge name → adapter key of a whole tensor
            factors: dict[str, dict[str, str]] = {}   # module → factor kind → adapter key
            for key in self._weights.specs:
                kind, target, factor = _parse_key(key, file)
                if kind == "lora":
                    factors.setdefault(target, {})[factor] = key
                    continue
                if target not in names:
                    if prefix is None:
                        raise MergeInputError(f"{file}: tensor {key!r} replaces {target!r}, which the base does not have")
                    continue  # outside the merged prefix
                shape, _ = self._weights.specs[key]
                if tuple(shape) != tuple(self.specs[names[target]][0]):
                    raise MergeInputError(f"{file}: tensor {key!r} has shape {tuple(shape)}, the base's {target!r} "
                                          f"{tuple(self.specs[names[target]][0])}")
                self._full[names[target]] = key
            self._lora: dict[str, tuple[str, str, float, bool]] = {}  # merge name → (A, B, scaling, embedding)
            for module, pair in factors.items():
                self._add_module(module, pair, config, names, file, prefix)
        except BaseException:
            self.close()
            raise

    def _add_module(self, module: str, pair: dict[str, str], config: dict[str, Any], names: dict[str, str],
                    file: Path, prefix: Optional[str]) -> None:
        embedding = "lora_embedding_A" in pair or "lora_embedding_B" in pair
        a_key = pair.get("lora_embedding_A" if embedding else "lora_A")
        b_key = pair.get("lora_embedding_B" if embedding else "lora_B")
        if a_key is None or b_key is None:
            raise MergeInputError(f"{file}: module {module!r} has {', '.join(sorted(pair.values()))} but not both LoRA factors")
        target = f"{module}.weight"
        if target not in names:
            if prefix is None:
                raise MergeInputError(f"{file}: tensor {a_key!r} adapts {target!r}, which the base does not have")
            return
        name = names[target]
        (a_shape, _), (b_shape, _) = self._weights.specs[a_key], self._weights.specs[b_key]
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise MergeInputError(f"{file}: tensor {a_key!r} has shape {tuple(a_shape)}: only LoRA on linear and "
                                  "embedding layers is supported (not convolutions)")
        rank = pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        if a_shape[0] != rank or b_shape[1] != rank:
            raise MergeInputError(f"{file}: tensor {a_key!r} has rank {a_shape[0]} where r/rank_pattern give {rank}")
        # PEFT's scaling (a Python float, so the product rounds as PEFT's does).
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        transpose = embedding or self.fan_in_fan_out
        out_shape = (a_shape[1], b_shape[0]) if transpose else (b_shape[0], a_shape[1])
        base_shape = tuple(self.specs[name][0])
        if out_shape != base_shape:
            raise MergeInputError(f"{file}: {a_key!r}·{b_key!r} make a {out_shape} update for {target!r} of shape "
                                  f"{base_shape}" + ("" if transpose else " (fan_in_fan_out?)"))
        if not self.specs[name][1].is_floating_point:
            raise MergeInputError(f"{file}: tensor {a_key!r} adapts {target!r}, which is not floating point")
        self._lora[name] = (a_key, b_key, scaling, embedding)

    def key(self, name: str) -> str:
        assert self.base is not None
        return self.base.key(name)

    @property
    def adapted(self) -> list[str]:
        """Names of the tensors the adapter changes (low-rank updates and whole replacements)."""
        return sorted(set(self._lora) | set(self._full))

    def get(self, name: str) -> torch.Tensor:
        assert self.base is not None
        if name in self._full:
            weight = self._weights.get(self._full[name]).to(self.specs[name][1])
        else:
            weight = self.base.get(name)
        if name not in self._lora:
            return weight
        a_key, b_key, scaling, embedding = self._lora[name]
        # As merge_and_unload() computes it, bit for bit: PEFT holds the factors in fp32 (it upcasts
        # bf16/fp16 adapters on load), forms (B·A)ᵀ·s in fp32, and adds that to a Linear's weight
        # in place (fp32 arithmetic, one rounding to the weight's dtype) but casts it to the weight's
        # dtype first for an Embedding.
        delta = self._weights.get(b_key).float() @ self._weights.get(a_key).float()
        if embedding or self.fan_in_fan_out:
            delta = delta.T
        delta = delta * scaling
        return weight.add_(delta.to(weight.dtype) if embedding else delta)

    def close(self) -> None:
        self._weights.close()
        if self.base is not None:
            self.base.close()


def check_adapter(folder: PathLike) -> None:
    """Read an adapter's config and tensor names (not its tensors) and refuse what get() could not do."""
    folder = Path(folder)
    read_adapter_config(folder)
    weights = _open_weights(folder)
    try:
        for key in weights.specs:
            _parse_key(key, weights.path)
    finally:
        weights.close()
