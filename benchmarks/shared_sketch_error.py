"""Does sketching every residual of a layer with one Ω (DESIGN §3: Yᵢ = Σⱼ cᵢⱼ Zⱼ) change the merge error?

    python benchmarks/shared_sketch_error.py --specialists 8 --trials 3

On one layer of the synthetic ViT-B family (float64 throughout, core = mean task vector), each residual
Fᵢ is truncated to rank r by the range finder the engine runs (s = r + 10, one power iteration) started
from a shared Ω or from independent Ωᵢ. Printed per trial: the error of Σᵢ sᵢF̃ᵢ (sᵢ = 1/‖F̃ᵢ,opt‖, as the
merge's unit-norm residuals) against the same sum of exact rank-r truncations, and the worst
per-residual ratio ‖Fᵢ − F̃ᵢ‖ / ‖Fᵢ − F̃ᵢ,opt‖.
"""

from __future__ import annotations

import argparse

import torch

from synthetic import synthetic_family, vit_shapes


def range_finder(f: torch.Tensor, omega: torch.Tensor, rank: int) -> torch.Tensor:
    q = torch.linalg.qr(f @ omega).Q
    q = torch.linalg.qr(f @ torch.linalg.qr(f.T @ q).Q).Q
    u, s, vh = torch.linalg.svd(q.T @ f, full_matrices=False)
    return (q @ u[:, :rank] * s[:rank]) @ vh[:rank]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specialists", type=int, default=8)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--layer", default="blocks.0.mlp.fc1.weight")
    args = parser.parse_args()
    N = args.specialists
    models = synthetic_family(vit_shapes(768, 1), N, seed=N)
    weights = [m[args.layer].double() for m in models]
    tau = torch.stack([w - weights[0] for w in weights[1:]])
    residuals = tau - tau.mean(0)
    n = residuals.shape[2]
    rank = int(0.1 * min(residuals.shape[1:]))
    u, s, vh = torch.linalg.svd(residuals, full_matrices=False)
    optimal = (u[:, :, :rank] * s[:, None, :rank]) @ vh[:, :rank]
    scale = (1 / optimal.flatten(1).norm(dim=1))[:, None, None]
    target = (scale * optimal).sum(0)
    gen = torch.Generator().manual_seed(0)

    def errors(omegas: list[torch.Tensor]) -> tuple[float, float]:
        approx = torch.stack([range_finder(f, om, rank) for f, om in zip(residuals, omegas)])
        total = float(((scale * approx).sum(0) - target).norm() / target.norm())
        per = (approx - residuals).flatten(1).norm(dim=1) / (optimal - residuals).flatten(1).norm(dim=1)
        return total, float(per.max())

    print(f"{args.layer}, N = {N}, r = {rank}: error of the scaled residual sum (worst per-residual ratio)")
    for trial in range(args.trials):
        shared = torch.randn(n, rank + 10, generator=gen, dtype=torch.float64)
        independent = [torch.randn(n, rank + 10, generator=gen, dtype=torch.float64) for _ in range(N)]
        (ts, ps), (ti, pi) = errors([shared] * N), errors(independent)
        print(f"trial {trial}: shared Ω {ts:.3f} ({ps:.3f})   independent Ωᵢ {ti:.3f} ({pi:.3f})")


if __name__ == "__main__":
    main()
