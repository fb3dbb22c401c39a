"""mergekit YAML read as is: the translation of a mergekit merge config into r2m-merge's run settings.

A config is a mergekit one when it has ``merge_method``. What it can express here, with mergekit's
semantics and defaults (mergekit 0.1.5's, not r2m-merge's own):

    merge_method     linear → average (Σwᵢθᵢ/Σwᵢ; normalize: true by default), task_arithmetic
                     (θ₀ + λ·Σwᵢτᵢ; λ 1, normalize false), ties (density 1, λ 1, normalize true,
                     weights before the sign election), plus r2m and tsvm
    base_model       a folder, file or Hugging Face id (@revision allowed); linear without one
                     takes the first model as the reference for names and dtypes
    models[].model   a string, ``{model: path}`` or ``{model: {path, revision}}``; ``BASE+ADAPTER``
                     (mergekit's LoRA syntax) when the model is the base: the adapter is the specialist
    parameters       weight (per model), density (per model, ties), lambda, normalize, int8_mask
                     (no effect on the result), rescale: false; for r2m any R2MConfig field at top level
    dtype, out_dtype the output dtype (out_dtype, else dtype); the compute dtype here is float64 on
                     CPU (float32 on GPUs) whatever dtype says
    tokenizer_source base (default) or a model whose tokenizer files are copied (same vocabulary)

Anything else — slices and modules, gradient (list) or filtered parameter values, other methods,
tokenizer/chat_template settings, union tokenizers, rescale — raises ConfigError naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Optional

from r2m_fast.config import R2MConfig, parse_dtype

METHODS = {"linear": "average", "task_arithmetic": "task_arithmetic", "ties": "ties", "r2m": "r2m", "tsvm": "tsvm"}
# Parameters each method reads (model-level ones first); anything else in `parameters` is refused.
_PER_MODEL = {"linear": ("weight",), "task_arithmetic": ("weight", "density"), "ties": ("weight", "density"),
              "tsvm": ("weight",), "r2m": ("weight",)}
_SHARED = {"linear": ("normalize",), "task_arithmetic": ("lambda", "normalize", "int8_mask", "rescale"),
           "ties": ("lambda", "normalize", "int8_mask", "rescale"), "tsvm": ("lambda",), "r2m": ()}
# mergekit's defaults for the shared parameters (GeneralizedTaskArithmeticMerge and linear_merge).
_DEFAULT_NORMALIZE = {"linear": True, "task_arithmetic": False, "ties": True}
# r2m-merge keys a mergekit YAML may also carry (mergekit-yaml takes them on its command line).
RUN_KEYS = ("output", "shard_size", "device", "spill_dir")
_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
         "tokenizer", "chat_template", "slices", "modules")


class ConfigError(ValueError):
    """A mergekit key or value r2m-merge cannot express; the message names the key."""


def is_mergekit(data: dict[str, Any]) -> bool:
    return "merge_method" in data


def _model_ref(value: Any, key: str) -> tuple[str, Optional[str]]:
    """(model, lora or None) from a mergekit ModelReference: "path[@rev][+lora]" or a mapping."""
    if isinstance(value, str):
        chunks = value.split("+")
        if len(chunks) > 2 or not all(chunks):
            raise ConfigError(f"{key}: cannot read model reference {value!r}")
        return chunks[0], (chunks[1] if len(chunks) == 2 else None)
    if isinstance(value, dict):
        unknown = sorted(set(value) - {"model", "lora"})
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}: not supported")
        model, lora = value.get("model"), value.get("lora")
        return _model_path(model, f"{key}.model"), (None if lora is None else _model_path(lora, f"{key}.lora"))
    raise ConfigError(f"{key}: expected a model path or id, got {value!r}")


def _model_path(value: Any, key: str) -> str:
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        unknown = sorted(set(value) - {"path", "revision"})
        if unknown:
            raise ConfigError(f"{key}.{unknown[0]}: not supported")
        return value["path"] + (f"@{value['revision']}" if value.get("revision") else "")
    raise ConfigError(f"{key}: expected a model path or id, got {value!r}")


def _scalar(value: Any, key: str) -> Any:
    """A parameter's one value; mergekit's per-tensor forms (filters, gradients) are refused."""
    if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value)):
        raise ConfigError(f"{key}: conditional values (filter:) are not supported; give one number")
    if isinstance(value, list):
        raise ConfigError(f"{key}: gradients (a list of values across layers) are not supported; give one number")
    return value


def _number(value: Any, key: str) -> float:
    value = _scalar(value, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}: must be a number, got {value!r}")
    return float(value)


def _bool(value: Any, key: str) -> bool:
    value = _scalar(value, key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    return value


def _same(a: str, b: str) -> bool:
    from r2m_fast.hf import looks_like_repo_id

    if a == b:
        return True
    if looks_like_repo_id(a) or looks_like_repo_id(b):
        return False
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def translate(data: dict[str, Any]) -> dict[str, Any]:
    """r2m-merge settings (base, specialists, method, options, R2MConfig fields, tokenizer_source,
    and any RUN_KEYS given) from a parsed mergekit YAML. Raises ConfigError naming the key."""
    unknown = sorted(set(data) - set(_KEYS) - set(RUN_KEYS))
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a mergekit key r2m-merge knows")
    for key, what in (("slices", "layer slices (frankenmerges)"), ("modules", "per-module definitions"),
                      ("tokenizer", "tokenizer: settings (build a tokenizer, resize embeddings)"),
                      ("chat_template", "chat_template")):
        if data.get(key) is not None:
            raise ConfigError(f"{key}: {what} are not supported; use models: and tokenizer_source")
    name = data["merge_method"]
    if not isinstance(name, str) or name not in METHODS:
        raise ConfigError(f"merge_method: {name!r} is not supported; r2m-merge reads {', '.join(METHODS)}")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError("models: a list of models to merge is required")
    base = None
    if data.get("base_model") is not None:
        base, lora = _model_ref(data["base_model"], "base_model")
        if lora is not None:
            raise ConfigError("base_model: a base with a LoRA (+) is not supported; merge that adapter into it first")
    top = data.get("parameters") or {}
    if not isinstance(top, dict):
        raise ConfigError("parameters: must be a mapping")
    entries = []
    for i, entry in enumerate(models):
        key = f"models[{i}]"
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"{key}: expected a mapping with model:")
        extra = sorted(set(entry) - {"model", "parameters"})
        if extra:
            raise ConfigError(f"{key}.{extra[0]}: not supported")
        model, lora = _model_ref(entry["model"], f"{key}.model")
        if lora is not None:
            if base is None or not _same(model, base):
                raise ConfigError(f"{key}.model: a LoRA (+) on a model other than base_model is not supported")
            model = lora
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{key}.parameters: must be a mapping")
        entries.append((key, model, params))
    if base is None:
        if name != "linear":
            raise ConfigError(f"base_model: required by merge_method {name}")
        base = entries[0][1]
    elif name != "linear":  # mergekit leaves the base out of the task vectors
        entries = [e for e in entries if not _same(e[1], base)]
    elif not any(_same(e[1], base) for e in entries):  # linear averages the base_model too
        entries.append(("base_model", base, {}))
    if len(entries) < 2:
        raise ConfigError(f"models: {name} needs at least 2 models besides the base, got {len(entries)}")

    shared: dict[str, Any] = {}
    config: dict[str, Any] = {}
    r2m_fields = {f.name for f in dataclasses.fields(R2MConfig)} - {"out_dtype"}
    for pkey, value in top.items():
        if pkey in _SHARED[name]:
            shared[pkey] = value
        elif pkey in _PER_MODEL[name]:
            continue  # a default for every model, read below
        elif name == "r2m" and pkey in r2m_fields:
            config[pkey] = value
        else:
            raise ConfigError(f"parameters.{pkey}: not a parameter of merge_method {name}")
    per_model: dict[str, list[float]] = {p: [] for p in _PER_MODEL[name]}
    for key, _, params in entries:
        for pkey in params:
            if pkey not in _PER_MODEL[name]:
                raise ConfigError(f"{key}.parameters.{pkey}: not a per-model parameter of merge_method {name}")
        for pkey in _PER_MODEL[name]:
            if pkey in params:
                per_model[pkey].append(_number(params[pkey], f"{key}.parameters.{pkey}"))
            elif pkey in top:
                per_model[pkey].append(_number(top[pkey], f"parameters.{pkey}"))
            else:
                per_model[pkey].append(1.0)  # mergekit: density defaults to 1; weight is required there

    options: dict[str, Any] = {}
    weights = per_model["weight"]
    if name in _DEFAULT_NORMALIZE:
        options["normalize"] = _bool(shared.get("normalize", _DEFAULT_NORMALIZE[name]), "parameters.normalize")
    if name in ("task_arithmetic", "ties", "tsvm"):
        options["scaling"] = _number(shared.get("lambda", 1.0), "parameters.lambda")
    if "rescale" in shared and _bool(shared["rescale"], "parameters.rescale") and name == "ties":
        raise ConfigError("parameters.rescale: rescaling the trimmed task vectors is not supported")
    if "int8_mask" in shared:
        _bool(shared["int8_mask"], "parameters.int8_mask")  # the mask's dtype only; same result
    if name == "ties":
        density = per_model["density"]
        if any(not 0 < d <= 1 for d in density):
            raise ConfigError(f"parameters.density: must be in (0, 1], got {density}")
        options["density"] = density[0] if len(set(density)) == 1 else density
    if name in ("linear", "task_arithmetic", "ties"):
        if any(w != 1.0 for w in weights):
            options["weights"] = weights
    elif len(set(weights)) != 1:
        raise ConfigError(f"models[].parameters.weight: merge_method {name} takes one weight for all models, "
                          f"got {weights}")
    elif name == "tsvm":
        options["scaling"] *= weights[0]  # TSV-M is homogeneous in τ: a uniform weight scales the result
    elif weights[0] != 1.0:
        raise ConfigError("models[].parameters.weight: r2m weighs the task vectors itself; omit weight or give 1")

    out: dict[str, Any] = {"base": base, "specialists": [e[1] for e in entries], "method": METHODS[name]}
    if options:
        out["options"] = options
    out.update(config)
    dtype = data.get("out_dtype") or data.get("dtype")
    if dtype is not None:
        key = "out_dtype" if data.get("out_dtype") else "dtype"
        try:
            out["out_dtype"] = str(parse_dtype(dtype, key)).removeprefix("torch.")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    source = data.get("tokenizer_source")
    if source == "union":
        raise ConfigError("tokenizer_source: union (a merged vocabulary, resized embeddings) is not supported")
    if source not in (None, "base"):
        model, lora = _model_ref(source, "tokenizer_source")
        if lora is not None:
            raise ConfigError("tokenizer_source: a model with a LoRA (+) is not supported")
        out["tokenizer_source"] = model
    for key in RUN_KEYS:
        if key in data:
            out[key] = data[key]
    return out
