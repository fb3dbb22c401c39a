"""Tiny Hugging Face models built offline for the interop tests: a 2-layer Llama, its tokenizer,
fine-tuned copies, and PEFT LoRA adapters with their merge_and_unload() models.

Import only from tests that have already called pytest.importorskip("transformers") (and "peft"
for the adapters).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 128


def llama_config(**overrides: Any):
    from transformers import LlamaConfig

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def save_tokenizer(folder: Path, words: int = VOCAB - 3, chat_template: str | None = None) -> None:
    """A word-level fast tokenizer over w0 … w{words-1}, saved as transformers saves one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(str(folder))


def perturbed(model, seed: int, scale: float = 0.02):
    """`model` with every parameter moved by seeded Gaussian noise (a stand-in for fine-tuning)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))
    return model


def build_llama_family(root: Path, n: int = 2, dtype: torch.dtype = torch.float32) -> tuple[Path, list[Path]]:
    """root/base (with tokenizer) and root/ft{i} (full fine-tunes), saved with save_pretrained."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config()).to(dtype)
    base.save_pretrained(str(root / "base"))
    save_tokenizer(root / "base")
    specialists = []
    for i in range(n):
        model = LlamaForCausalLM.from_pretrained(str(root / "base"), dtype=dtype)
        perturbed(model, seed=100 + i).save_pretrained(str(root / f"ft{i}"))
        specialists.append(root / f"ft{i}")
    return root / "base", specialists


def make_adapter(base_dir: Path, adapter_dir: Path, merged_dir: Path, seed: int, model_cls=None,
                 safe_serialization: bool = True, **lora: Any) -> None:
    """A LoRA adapter on base_dir with random nonzero factors (and modules_to_save copies), saved
    to adapter_dir, and PEFT's merge_and_unload() of it saved to merged_dir."""
    from peft import LoraConfig, get_peft_model

    if model_cls is None:
        from transformers import LlamaForCausalLM as model_cls
    model = model_cls.from_pretrained(str(base_dir))
    peft_model = get_peft_model(model, LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen).to(p.dtype))
    peft_model.save_pretrained(str(adapter_dir), safe_serialization=safe_serialization)
    peft_model.merge_and_unload().save_pretrained(str(merged_dir))
