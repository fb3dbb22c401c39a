"""Geometry of one seed's task vectors, and of each merge's update: why R²M lands where it does.

    python -m benchmarks.detector.diagnose [--seed 0] [--config full]

Needs the trained models that `python -m benchmarks.detector.run --full --reuse-training` keeps
under build/detector-cache/. Prints task-vector norms, pairwise cosines, R²M's Gram eigenvalues and
core coefficients, and for each method ‖θ*−θ₀‖ and its cosine with the mean task vector τ̄
(backbone only; the head is left out).
"""

from __future__ import annotations

import argparse
import os

import torch

from benchmarks.detector import data, merging, run
from benchmarks.detector.model import pretrained_detector


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default="full", choices=sorted(run.CONFIGS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    path = run._cache_path(run.CONFIGS[args.config], args.seed)
    if not os.path.isfile(path):
        raise SystemExit(f"{path} missing: run `python -m benchmarks.detector.run --{args.config} --reuse-training` first")
    cached = torch.load(path, weights_only=True)
    base = pretrained_detector(head_seed=args.seed).state_dict()
    specs = [cached["specialists"][f] for f in data.TRAIN_FAMILIES]
    keys = [k for k in base if base[k].is_floating_point() and not k.startswith("head.")]

    def delta(sd):
        return torch.cat([(sd[k].double() - base[k].double()).flatten() for k in keys])

    T = torch.stack([delta(s) for s in specs])
    tbar = T.mean(0)
    Tn = T / T.norm(dim=1, keepdim=True)
    lines = [f"seed {args.seed}, config {args.config}; families {', '.join(data.TRAIN_FAMILIES)}",
             "task-vector norms: " + ", ".join(f"{float(x):.3f}" for x in T.norm(dim=1)) + f"; ‖τ̄‖ = {float(tbar.norm()):.3f}",
             "pairwise cosines:"] + ["  " + " ".join(f"{float(x):5.2f}" for x in row) for row in Tn @ Tn.T]
    for method, opts in merging.HEADLINE.items():
        sd, rep = merging.merge(base, specs, method, seed=args.seed, **opts)
        d = delta(sd)
        lines.append(f"{method:16s} ‖θ*−θ₀‖ = {float(d.norm()):.3f}, cos(θ*−θ₀, τ̄) = {float(d @ tbar / d.norm() / tbar.norm()):.4f}")
        if method == "r2m":
            lines.append("  R²M Gram eigenvalues: " + ", ".join(f"{e:.0f}" for e in rep["eigenvalues"])
                         + "; core coefficients w: " + ", ".join(f"{w:.3f}" for w in rep["core_coeffs"])
                         + f" (τ̄ has 0.200 each); ‖τ_core‖ = {rep['core_norm']:.3f}, η = {rep['eta']:.3f}")
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
