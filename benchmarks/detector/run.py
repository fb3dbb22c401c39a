"""Run the detector benchmark end to end on CPU and write tables and plots.

    python -m benchmarks.detector.run --smoke          # tiny patches, few steps, 1 seed (< 2 min)
    python -m benchmarks.detector.run --full           # the reported configuration (3 seeds)

Per seed: build real/fake patches; fine-tune one specialist per training family and a joint model
(same total steps) from the same ImageNet MobileNetV2 + head; merge the five specialists with every
method through r2m_fast.merge; sweep R²M's rank_ratio × alpha and task arithmetic's λ; merge every
4-subset (leave-one-family-out, which is also "merge 4, then add the 5th by re-merging"); score
AUC per family. Results are written after every seed, so an interrupted run still leaves the seeds
it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from benchmarks.detector import data, merging, train
from benchmarks.detector.model import pretrained_detector

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "detector")


@dataclass
class Config:
    name: str
    size: int                 # patch side (px)
    steps: int                # fine-tuning steps per specialist; the joint model gets steps × #families
    batch_size: int
    lr: float
    n_train_real: int
    n_train_fake: int         # per training family
    n_test_real: int
    n_test_fake: int          # per family
    seeds: tuple[int, ...]
    r2m_sweep: dict = field(default_factory=lambda: dict(merging.R2M_SWEEP))
    ta_sweep: dict = field(default_factory=lambda: dict(merging.TA_SWEEP))
    strength: Optional[dict] = None  # overrides of data.FAMILY_STRENGTH
    threads: int = 2


CONFIGS = {
    "full": Config("full", size=64, steps=150, batch_size=32, lr=1e-4, n_train_real=1500, n_train_fake=600,
                   n_test_real=400, n_test_fake=250, seeds=(0, 1, 2)),
    # CI: the whole pipeline on 48-px patches with a few steps; numbers mean nothing beyond "it runs
    # and specialists learn their own family".
    "smoke": Config("smoke", size=48, steps=30, batch_size=32, lr=3e-4, n_train_real=128, n_train_fake=64,
                    n_test_real=96, n_test_fake=64, seeds=(0,),
                    # Stronger splice and double JPEG than the full run: at 48 px and 30 steps their
                    # specialists are otherwise too close to chance for a stable CI check.
                    strength={"gan_upsample": 0.4, "face_splice": 0.8, "double_jpeg": (10, 20), "diffusion_texture": 0.7},
                    r2m_sweep={"rank_ratio": (0.1, 1.0), "alpha": (0.6,)}, ta_sweep={"scaling": (0.3,)},
                    # One thread: on a shared 2-core runner two threads measured up to 3× slower here.
                    threads=1),
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _mean(d: dict[str, float], keys) -> float:
    vals = [d[k] for k in keys if k in d]
    return float(np.mean(vals)) if vals else float("nan")


def _cache_path(cfg: Config, seed: int) -> str:
    """Trained models of one seed, keyed by everything that determines them, in the ignored build/."""
    key = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("name", "seeds", "r2m_sweep", "ta_sweep", "threads")}
    key["strength"] = dict(data.FAMILY_STRENGTH, **(cfg.strength or {}))
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return os.path.join(REPO, "build", "detector-cache", f"seed{seed}-{digest}.pt")


def run_seed(cfg: Config, seed: int, log, reuse: bool = False) -> dict[str, Any]:
    seed_everything(seed)
    t0 = time.perf_counter()
    ds = data.build_dataset(cfg.size, cfg.n_train_real, cfg.n_train_fake, cfg.n_test_real, cfg.n_test_fake,
                            seed=seed, strength=cfg.strength)
    log(f"[seed {seed}] data {time.perf_counter() - t0:.0f}s")
    test, fams = ds["test"], data.TRAIN_FAMILIES
    base = pretrained_detector(head_seed=seed)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    out: dict[str, Any] = {"seed": seed, "models": {}, "merge_seconds": {}, "unavailable": {}, "lofo": {},
                           "r2m_sweep": {}, "ta_sweep": {}, "times": {}}

    def evaluate(state, families=None):
        return train.evaluate(train.load(state), test, families)

    out["models"]["base"] = evaluate(base_sd)

    cache = _cache_path(cfg, seed) if reuse else None
    cached = torch.load(cache, weights_only=True) if cache and os.path.isfile(cache) else None
    if cached is not None:
        log(f"[seed {seed}] reusing trained specialists and joint model from {cache}")
        out["reused_training"] = cache
    t = time.perf_counter()
    specs = {}
    for i, fam in enumerate(fams):
        specs[fam] = cached["specialists"][fam] if cached else train.finetune(
            base, ds["train"], [fam], cfg.steps, cfg.batch_size, cfg.lr, seed=seed * 100 + i)
        out["models"][f"specialist:{fam}"] = evaluate(specs[fam])
        log(f"[seed {seed}] specialist {fam}: own-family AUC {out['models'][f'specialist:{fam}'][fam]:.3f}")
    out["times"]["specialists_s"] = time.perf_counter() - t
    t = time.perf_counter()
    joint = cached["joint"] if cached else train.finetune(
        base, ds["train"], list(fams), cfg.steps * len(fams), cfg.batch_size, cfg.lr, seed=seed * 100 + 99)
    out["models"]["joint"] = evaluate(joint)
    out["times"]["joint_s"] = time.perf_counter() - t
    if reuse and cached is None:
        # Kept so a later run can redo every merge without retraining (e.g. when a method lands).
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        torch.save({"specialists": specs, "joint": joint}, cache)
    log(f"[seed {seed}] joint: mean ID AUC {_mean(out['models']['joint'], fams):.3f}")
    del joint

    spec_list = [specs[f] for f in fams]
    t = time.perf_counter()
    for method, opts in merging.HEADLINE.items():
        try:
            merged, report = merging.merge(base_sd, spec_list, method, seed=seed, **opts)
        except merging.MethodUnavailable as exc:
            out["unavailable"][method] = str(exc)
            log(f"[seed {seed}] {method}: UNAVAILABLE ({exc})")
            continue
        out["models"][method] = evaluate(merged)
        out["merge_seconds"][method] = report["wall_seconds"]
        log(f"[seed {seed}] {method}: mean ID {_mean(out['models'][method], fams):.3f}, "
            f"held-out {_mean(out['models'][method], data.HELDOUT_FAMILIES):.3f}")

    # Sensitivity sweeps (reported apart from the headline: picking the best cell would tune on test).
    for rr in cfg.r2m_sweep["rank_ratio"]:
        for alpha in cfg.r2m_sweep["alpha"]:
            key = f"rank_ratio={rr},alpha={alpha}"
            opts = dict(merging.HEADLINE["r2m"], rank_ratio=rr, alpha=alpha)
            merged, _ = merging.merge(base_sd, spec_list, "r2m", seed=seed, **opts)
            out["r2m_sweep"][key] = evaluate(merged)
    out["ablations"] = {}
    for label, (method, opts, as_matrix) in merging.ABLATIONS.items():
        if method in out["unavailable"]:
            continue
        merged, _ = merging.merge(base_sd, spec_list, method, seed=seed, as_matrix=as_matrix, **opts)
        out["ablations"][label] = evaluate(merged)
    if "task_arithmetic" not in out["unavailable"]:
        for lam in cfg.ta_sweep["scaling"]:
            merged, _ = merging.merge(base_sd, spec_list, "task_arithmetic", scaling=lam)
            out["ta_sweep"][f"scaling={lam}"] = evaluate(merged)

    # Leave-one-family-out: merge the other four, score the left-out family and the four merged ones.
    # The same merges are the "merge 4" step of add-a-specialist; the full merge above is "add the 5th".
    for method, opts in merging.HEADLINE.items():
        if method in out["unavailable"]:
            continue
        out["lofo"][method] = {}
        for left in fams:
            merged, report = merging.merge(base_sd, [specs[f] for f in fams if f != left], method, seed=seed, **opts)
            out["lofo"][method][left] = evaluate(merged, list(fams))
        log(f"[seed {seed}] LOFO {method}: mean left-out AUC "
            f"{np.mean([out['lofo'][method][f][f] for f in fams]):.3f}")
    out["times"]["merges_and_eval_s"] = time.perf_counter() - t
    out["times"]["seed_s"] = time.perf_counter() - t0
    return out


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="the reported configuration (default)")
    mode.add_argument("--smoke", action="store_true", help="tiny, 1 seed: checks the pipeline (< 2 min)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the seeds")
    parser.add_argument("--steps", type=int, help="override fine-tuning steps per specialist")
    parser.add_argument("--threads", type=int, help="torch threads (default 2)")
    parser.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT}, smoke: <out>/smoke)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNGs (tables only)")
    parser.add_argument("--reuse-training", action="store_true",
                        help="save the trained specialists/joint model under build/detector-cache/ and, when a "
                             "previous run with the same configuration saved them, load them instead of training "
                             "(redoes every merge and evaluation)")
    args = parser.parse_args(argv)

    cfg = CONFIGS["smoke" if args.smoke else "full"]
    overrides = {}
    if args.seeds:
        overrides["seeds"] = tuple(args.seeds)
    if args.steps:
        overrides["steps"] = args.steps
    if overrides:
        # A changed configuration is labelled as such in every output it writes.
        cfg = dataclasses.replace(cfg, name=cfg.name + "-reduced", **overrides)
    if args.threads:
        cfg = dataclasses.replace(cfg, threads=args.threads)  # changes speed, not the experiment
    out_dir = args.out or (os.path.join(DEFAULT_OUT, "smoke") if args.smoke else DEFAULT_OUT)
    os.makedirs(out_dir, exist_ok=True)
    torch.set_num_threads(cfg.threads)

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    started = time.perf_counter()
    meta = {"config": dataclasses.asdict(cfg), "command": " ".join([os.path.basename(sys.executable), "-m",
                                                                    "benchmarks.detector.run"] + (argv if argv is not None else sys.argv[1:])),
            "torch": torch.__version__, "python": platform.python_version(), "threads": cfg.threads,
            "cpu": platform.processor() or platform.machine(), "strength": dict(data.FAMILY_STRENGTH, **(cfg.strength or {}))}
    seeds = []
    from benchmarks.detector import report  # matplotlib is imported lazily inside
    for seed in cfg.seeds:
        seeds.append(run_seed(cfg, seed, log, reuse=args.reuse_training))
        meta["total_seconds"] = time.perf_counter() - started
        meta["seeds_done"] = [s["seed"] for s in seeds]
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump({"meta": meta, "seeds": seeds}, f, indent=1)
        report.write(out_dir, meta, seeds, plots=not args.no_plots)
        log(f"seed {seed} done; {meta['total_seconds'] / 60:.1f} min so far; results in {out_dir}")
    return {"meta": meta, "seeds": seeds}


if __name__ == "__main__":
    main()
