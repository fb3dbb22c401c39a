"""Hugging Face interop: model ids from the local cache, and the files that make a merged folder a model.

A merge's inputs may be Hugging Face repo ids (``org/name``, optionally ``org/name@revision``):
they resolve through the local Hugging Face cache only (``huggingface_hub.snapshot_download`` with
``local_files_only=True``), so a merge never downloads anything; an id that is not cached is a
MergeInputError naming it.

The output folder becomes a drop-in ``from_pretrained`` folder: ``config.json`` (the base's, with
its dtype fields set to what was written), ``generation_config.json``, the tokenizer files (from
the base or another model) and a ``README.md`` model card, all added to the writer's transaction
so they appear with the shards or not at all. Nothing here imports transformers.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from r2m_fast.plan import MergeInputError

PathLike = Union[str, os.PathLike]

CONFIG_JSON = "config.json"
GENERATION_CONFIG_JSON = "generation_config.json"
MODEL_CARD = "README.md"
# Tokenizer and processor files transformers' AutoTokenizer/AutoProcessor read from a model folder
# (fixed names, plus the vocab/merges/sentencepiece files of the slow tokenizers).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json",
    "video_preprocessor_config.json",
)
# Weight-file names whose folder is the model folder when a file rather than a folder is given.
_HF_WEIGHT_FILE = re.compile(r"^(model|pytorch_model)(-\d{5}-of-\d{5})?\.(safetensors|bin)(\.index\.json)?$")
# A repo id as the Hub accepts it: one slash, name characters, optionally "@revision".
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}(@[\w./-]+)?$")
_DTYPE_KEYS = ("torch_dtype", "dtype")


# ----------------------------------------------------------------------------------------------
# Hub ids
# ----------------------------------------------------------------------------------------------


def looks_like_repo_id(spec: PathLike) -> bool:
    """True for a string such as ``org/name`` (or ``org/name@rev``) that is not an existing path."""
    text = os.fspath(spec)
    return isinstance(text, str) and not os.path.exists(text) and bool(_REPO_ID.match(text)) and ".." not in text


def resolve_model(spec: PathLike) -> Path:
    """A local path for `spec`: itself when it exists (or does not look like a repo id, so the
    reader can say it is missing), else the cached snapshot of the Hugging Face repo it names.

    Raises MergeInputError naming the id when it is not in the local cache (never downloads)."""
    if not looks_like_repo_id(spec):
        return Path(spec)
    text = os.fspath(spec)
    repo_id, _, revision = text.partition("@")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import constants
    except ImportError:
        raise MergeInputError(
            f"{text}: no such file or folder (as a Hugging Face repo id it needs huggingface_hub installed)"
        ) from None
    try:
        folder = snapshot_download(repo_id, revision=revision or None, local_files_only=True)
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError, ... all mean "not usable here"
        raise MergeInputError(
            f"{text}: no such file or folder, and not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); fetch it first, e.g. `hf download {repo_id}` "
            f"({type(exc).__name__})"
        ) from None
    return Path(folder)


def recorded_path(spec: PathLike) -> str:
    """How an input is written into merge_config.yaml and the model card: an absolute path, or the
    repo id as given (it resolves again from the cache)."""
    return os.fspath(spec) if looks_like_repo_id(spec) else os.path.abspath(spec)


def model_folder(path: PathLike) -> Optional[Path]:
    """The folder holding a model's config and tokenizer: the folder itself, or the folder of an
    HF-named weight file (model.safetensors, a shard or an index); None for a loose checkpoint file."""
    path = Path(path)
    if path.is_dir():
        return path
    if _HF_WEIGHT_FILE.match(path.name):
        return path.parent
    return None


# ----------------------------------------------------------------------------------------------
# Output folder extras
# ----------------------------------------------------------------------------------------------


def dominant_dtype(layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]]) -> Optional[torch.dtype]:
    """The floating dtype holding most bytes of the output (what config.json's dtype should say)."""
    nbytes: dict[torch.dtype, int] = {}
    for _, shape, dtype in layout:
        if dtype.is_floating_point:
            numel = 1
            for d in shape:
                numel *= d
            nbytes[dtype] = nbytes.get(dtype, 0) + numel * dtype.itemsize
    return max(nbytes, key=nbytes.get) if nbytes else None


def _set_dtype(config: Any, name: str) -> bool:
    """Set every dtype field of a config (and of its nested sub-configs) to `name`; True if one was."""
    found = False
    if isinstance(config, dict):
        for key, value in config.items():
            if key in _DTYPE_KEYS and (value is None or isinstance(value, str)):
                config[key] = name
                found = True
            elif isinstance(value, dict):
                found |= _set_dtype(value, name)
    return found


def read_json_object(path: Path, what: str) -> dict[str, Any]:
    """A JSON file holding an object (a model or adapter config), or MergeInputError naming it."""
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise MergeInputError(f"{path}: unreadable {what} ({exc})") from None
    return data


def config_text(path: Path, dtype: Optional[torch.dtype]) -> str:
    """config.json with its dtype fields set to `dtype` (transformers 5 reads ``dtype``, earlier
    versions ``torch_dtype``; a config with neither gets both)."""
    config = read_json_object(path, "model config")
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        if not _set_dtype(config, name):
            config["torch_dtype"] = config["dtype"] = name
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def tokenizer_files(folder: Path) -> list[Path]:
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]


def _vocab(folder: Path) -> Optional[Any]:
    """The vocabulary of a fast tokenizer (tokenizer.json's model vocab and added tokens), if any."""
    try:
        data = json.loads((folder / "tokenizer.json").read_text())
        return data.get("model", {}).get("vocab"), [t.get("content") for t in data.get("added_tokens") or []]
    except (OSError, ValueError, AttributeError):
        return None


def check_tokenizer_source(source: Path, base: Optional[Path], label: str) -> list[Path]:
    """The tokenizer files of `source`, refusing one whose vocabulary differs from the base's: the
    merged embeddings are the base's rows, so another vocabulary would silently mismatch them."""
    folder = model_folder(source)
    files = tokenizer_files(folder) if folder is not None else []
    if not files:
        raise MergeInputError(f"{label}: {source} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    if base is not None and folder is not None:
        theirs, ours = _vocab(folder), _vocab(base)
        if theirs is not None and ours is not None and theirs != ours:
            raise MergeInputError(
                f"{label}: {source}'s tokenizer has another vocabulary than the base's; the merged embeddings "
                "follow the base's, so its tokenizer must match them"
            )
    return files


def model_card(
    base: str, specialists: Sequence[str], method: str, options: Mapping[str, Any], run_config_yaml: str,
    has_config: bool,
) -> str:
    """A README.md in the Hub's form: YAML front matter (base_model, library_name, tags), then prose."""
    import yaml

    meta = {
        "base_model": [base, *specialists],  # the merge's parents, as mergekit lists them
        "base_model_relation": "merge",
        "library_name": "transformers" if has_config else "safetensors",
        "tags": ["merge", "r2m_fast", method],
    }
    front = yaml.safe_dump(meta, sort_keys=False).strip()
    # R²M's settings are R2MConfig fields, not method options: the configuration below has them.
    opts = ", ".join(f"{k}={v}" for k, v in options.items()) or (
        "settings below" if method == "r2m" else "default options")
    lines = [
        "---", front, "---", "", f"# {Path(base).name} merge", "",
        f"This model was merged with [r2m_fast](https://arxiv.org/abs/2509.24367) using the **{method}** "
        f"method ({opts}).", "",
        "## Base model", "", f"- {base}", "",
        "## Models merged", "", *[f"- {s}" for s in specialists], "",
        "## Configuration", "", "The configuration `r2m-merge` ran with (`merge_config.yaml` in this folder):", "",
        "```yaml", run_config_yaml.rstrip(), "```", "",
    ]
    return "\n".join(lines)


def add_model_files(
    writer: Any,
    base: PathLike,
    specialists: Sequence[PathLike],
    layout: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    method: str,
    options: Mapping[str, Any],
    run_config_yaml: str,
    *,
    prefix: Optional[str] = None,
    copy_tokenizer: bool = True,
    tokenizer_source: Optional[PathLike] = None,
) -> list[str]:
    """Add config.json, generation_config.json, tokenizer files and README.md to `writer` (a
    ShardedSafetensorsWriter, before commit). Returns the file names added.

    The config and tokenizer come from the base's model folder (see model_folder) and are skipped
    when there is none, and under a `prefix` (the output then holds a sub-module, which the base's
    config does not describe). `tokenizer_source` (a folder, file or repo id) replaces the base's
    tokenizer; `copy_tokenizer=False` writes none."""
    added: list[str] = []
    folder = None if prefix is not None else model_folder(resolve_model(base))
    has_config = folder is not None and (folder / CONFIG_JSON).is_file()
    if has_config:
        writer.add_text(CONFIG_JSON, config_text(folder / CONFIG_JSON, dominant_dtype(layout)))
        added.append(CONFIG_JSON)
    if folder is not None and (folder / GENERATION_CONFIG_JSON).is_file():
        writer.add_file(GENERATION_CONFIG_JSON, folder / GENERATION_CONFIG_JSON)
        added.append(GENERATION_CONFIG_JSON)
    if copy_tokenizer and prefix is None:
        if tokenizer_source is not None:
            files = check_tokenizer_source(resolve_model(tokenizer_source), folder, "tokenizer_source")
        else:
            files = tokenizer_files(folder) if folder is not None else []
        for path in files:
            writer.add_file(path.name, path)
            added.append(path.name)
    card = model_card(recorded_path(base), [recorded_path(s) for s in specialists], method, options,
                      run_config_yaml, has_config)
    writer.add_text(MODEL_CARD, card)
    added.append(MODEL_CARD)
    return added
