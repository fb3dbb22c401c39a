"""Fine-tuning specialists / the joint model, scoring, and AUC."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from benchmarks.detector.model import Detector


def to_tensor(u8: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) → float (N, 3, H, W) in [0, 1]."""
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float().div_(255.0)


def finetune(base: Detector, train: Mapping[str, np.ndarray], families: Sequence[str], steps: int,
             batch_size: int, lr: float, seed: int) -> dict[str, torch.Tensor]:
    """Fine-tune a copy of `base` on real vs the union of `families`; returns its state dict.

    Each batch is half real, half fake; fakes are drawn uniformly over `families`, so the joint
    model (all training families, steps = Σ specialist steps) sees as many samples of each family
    as the specialist of that family.
    """
    model = Detector()
    model.load_state_dict(base.state_dict())
    model.train()  # BatchNorm stays in eval mode (Detector.train), only weights move
    gen = torch.Generator().manual_seed(seed)
    head = [p for n, p in model.named_parameters() if n.startswith("head.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    # The fresh head learns 10× faster than the pretrained features: the usual fine-tuning recipe.
    opt = torch.optim.Adam([{"params": body, "lr": lr}, {"params": head, "lr": 10 * lr}])
    real = train["real"]
    fakes = [train[f] for f in families]
    half = batch_size // 2
    loss_fn = nn.BCEWithLogitsLoss()
    y = torch.cat([torch.zeros(half), torch.ones(half)])
    for _ in range(steps):
        ri = torch.randint(len(real), (half,), generator=gen).numpy()
        fam = torch.randint(len(fakes), (half,), generator=gen).numpy()
        fi = torch.randint(min(len(f) for f in fakes), (half,), generator=gen).numpy()
        x = to_tensor(np.concatenate([real[ri], np.stack([fakes[a][b] for a, b in zip(fam, fi)])]))
        flip = torch.rand(batch_size, generator=gen) < 0.5  # horizontal flips keep every trace
        x[flip] = x[flip].flip(-1)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def score(model: Detector, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    model.eval()
    out = [model(to_tensor(images[i:i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(out).double().numpy()


def auc(neg: np.ndarray, pos: np.ndarray) -> float:
    """ROC AUC of `pos` (fake) scored above `neg` (real): the Mann–Whitney statistic, ties count ½.
    NaN when any score is not finite (a broken merge must not look like chance)."""
    if not (np.isfinite(neg).all() and np.isfinite(pos).all()):
        return float("nan")
    from scipy.stats import rankdata
    ranks = rankdata(np.concatenate([neg, pos]))
    n0, n1 = len(neg), len(pos)
    return float((ranks[n0:].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))


def evaluate(model: Detector, test: Mapping[str, np.ndarray], families: Sequence[str] | None = None) -> dict[str, float]:
    """AUC real-vs-family on the test split for each family (default: every fake family present)."""
    real = score(model, test["real"])
    fams = [f for f in test if f != "real"] if families is None else families
    return {f: auc(real, score(model, test[f])) for f in fams}


def load(state: Mapping[str, torch.Tensor]) -> Detector:
    model = Detector()
    model.load_state_dict(state)
    return model.eval()
