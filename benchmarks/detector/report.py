"""Markdown tables, PNG plots and a plain-words summary from the per-seed results."""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from benchmarks.detector import data, merging

ID, HO = data.TRAIN_FAMILIES, data.HELDOUT_FAMILIES
MERGES = tuple(merging.HEADLINE)
LABEL = {"base": "ImageNet backbone + fresh head (no fine-tuning)", "oracle": "specialists, each on its own family",
         "joint": "joint training (all 5 families, 5× steps)", "average": "weight averaging",
         "task_arithmetic": "task arithmetic (λ=0.3)", "ties": "TIES (top 20 %, λ=1)", "tsvm": "TSV-M (λ=1)",
         "r2m": "R²M (rank 0.1, α 0.6, head averaged)"}
SHORT = {"gan_upsample": "GAN up", "face_splice": "splice", "double_jpeg": "2×JPEG", "diffusion_texture": "diffusion",
         "spectral_colour": "spectral", "unseen_gan": "GAN-2*", "unseen_diffusion": "diffusion-2*", "copy_move": "copy-move*",
         "jpeg_resize": "JPEG+resize*"}


def _ms(vals: Sequence[float]) -> tuple[float, float]:
    v = np.asarray([x for x in vals], dtype=float)
    return float(np.mean(v)), float(np.std(v)) if len(v) > 1 else 0.0


def _fmt(vals: Sequence[float]) -> str:
    m, s = _ms(vals)
    if not np.isfinite(m):
        return "nan"
    return f"{m:.3f} ± {s:.3f}" if len(vals) > 1 else f"{m:.3f}"


def per_seed_rows(seeds: list[dict]) -> dict[str, list[dict[str, float]]]:
    """row name → one {family: AUC} per seed (oracle = each specialist on its own family)."""
    rows: dict[str, list[dict[str, float]]] = {}
    for s in seeds:
        models = s["models"]
        rows.setdefault("base", []).append(models["base"])
        rows.setdefault("oracle", []).append({f: models[f"specialist:{f}"][f] for f in ID})
        rows.setdefault("joint", []).append(models["joint"])
        for m in MERGES:
            if m in models:
                rows.setdefault(m, []).append(models[m])
    return rows


def mean_over(d: dict[str, float], fams) -> float:
    return float(np.mean([d[f] for f in fams if f in d])) if any(f in d for f in fams) else float("nan")


def summary_stats(seeds: list[dict]) -> dict[str, Any]:
    rows = per_seed_rows(seeds)
    stats = {name: {"id": _ms([mean_over(r, ID) for r in per]), "ho": _ms([mean_over(r, HO) for r in per])}
             for name, per in rows.items()}
    lofo = {}
    for m in MERGES:
        if all(m in s["lofo"] for s in seeds):
            lofo[m] = {
                "left_out": _ms([np.mean([s["lofo"][m][f][f] for f in ID]) for s in seeds]),
                # add-a-specialist: the 4 old families before (4-merge) and after (5-merge) adding the 5th
                "old_before": _ms([np.mean([np.mean([s["lofo"][m][f][g] for g in ID if g != f]) for f in ID]) for s in seeds]),
                "old_after": _ms([np.mean([np.mean([s["models"][m][g] for g in ID if g != f]) for f in ID]) for s in seeds]),
                "new_after": _ms([np.mean([s["models"][m][f] for f in ID]) for s in seeds]),
            }
    return {"rows": rows, "stats": stats, "lofo": lofo}


def _table_families(rows) -> list[str]:
    head = "| model | " + " | ".join(SHORT[f] for f in ID) + " | **mean ID** | " + \
        " | ".join(SHORT[f] for f in HO) + " | **mean held-out** |"
    lines = [head, "|" + "---|" * (len(ID) + len(HO) + 3)]
    for name in ("base", "oracle", "joint") + MERGES:
        if name not in rows:
            continue
        per = rows[name]
        cells = [_fmt([r[f] for r in per]) for f in ID] + [f"**{_fmt([mean_over(r, ID) for r in per])}**"]
        if name == "oracle":
            cells += ["—"] * len(HO) + ["—"]
        else:
            cells += [_fmt([r[f] for r in per]) for f in HO] + [f"**{_fmt([mean_over(r, HO) for r in per])}**"]
        lines.append(f"| {LABEL[name]} | " + " | ".join(cells) + " |")
    return lines


def _sweep_table(seeds, key: str, label: str) -> list[str]:
    cells = list(seeds[0][key])
    if not cells:
        return []
    lines = [f"| {label} | mean ID AUC | mean held-out AUC |", "|---|---|---|"]
    for c in cells:
        lines.append(f"| {c} | {_fmt([mean_over(s[key][c], ID) for s in seeds])} | "
                     f"{_fmt([mean_over(s[key][c], HO) for s in seeds])} |")
    return lines


def plain_summary(seeds: list[dict]) -> list[str]:
    """Sentences that state what the numbers show, generated from them (no hand-picked claims)."""
    st = summary_stats(seeds)
    stats, lofo = st["stats"], st["lofo"]
    out = []
    have = [m for m in MERGES if m in stats]
    if "r2m" not in stats or len(have) < 2:
        return ["Not enough merge methods ran to compare (see 'Unavailable methods')."]
    for kind, word in (("id", "in-distribution (the 5 merged families)"), ("ho", "held-out (4 unseen families)")):
        ranked = sorted(have, key=lambda m: -stats[m][kind][0])
        r_m, r_s = stats["r2m"][kind]
        best_other = next(m for m in ranked if m != "r2m")
        b_m, b_s = stats[best_other][kind]
        pos = ranked.index("r2m") + 1
        gap = r_m - b_m
        noise = max(r_s, b_s)
        verdict = ("wins" if gap > 0 else "loses") + (
            " by more than the seed-to-seed spread" if abs(gap) > noise else ", but within the seed-to-seed spread")
        out.append(f"- **{word.capitalize()}**: R²M ranks {pos}/{len(have)} among the merges (mean AUC {r_m:.3f}); "
                   f"the best other merge is {LABEL[best_other]} ({b_m:.3f}). R²M {verdict} "
                   f"(difference {gap:+.3f}, largest std {noise:.3f}).")
    j, o = stats["joint"]["id"][0], stats["oracle"]["id"][0]
    best_merge = max(have, key=lambda m: stats[m]["id"][0])
    out.append(f"- **Gap to training**: the best merge ({LABEL[best_merge]}, {stats[best_merge]['id'][0]:.3f} mean ID) "
               f"vs joint training {j:.3f} and the specialists on their own family {o:.3f}: merging "
               f"{'recovers most' if stats[best_merge]['id'][0] - 0.5 >= 0.8 * (o - 0.5) else 'does not recover most'} "
               f"of the specialists' margin over chance (0.5).")
    if lofo:
        ranked = sorted(lofo, key=lambda m: -lofo[m]["left_out"][0])
        out.append("- **Leave-one-family-out** (a family no merged specialist saw): "
                   + ", ".join(f"{m} {lofo[m]['left_out'][0]:.3f}" for m in ranked) + ".")
        if "r2m" in lofo:
            r = lofo["r2m"]
            out.append(f"- **Add a specialist** (R²M, merge 4 then re-merge with the 5th): the 4 old families go "
                       f"{r['old_before'][0]:.3f} → {r['old_after'][0]:.3f}, the new family "
                       f"{r['left_out'][0]:.3f} → {r['new_after'][0]:.3f} (averaged over which family is added). "
                       + "For comparison: " + ", ".join(
                           f"{m} old {lofo[m]['old_before'][0]:.3f} → {lofo[m]['old_after'][0]:.3f}, new "
                           f"{lofo[m]['left_out'][0]:.3f} → {lofo[m]['new_after'][0]:.3f}" for m in lofo if m != "r2m") + ".")
    if seeds[0]["r2m_sweep"]:
        cells = list(seeds[0]["r2m_sweep"])
        ids = {c: np.mean([mean_over(s["r2m_sweep"][c], ID) for s in seeds]) for c in cells}
        best = max(ids, key=ids.get)
        worst = min(ids, key=ids.get)
        out.append(f"- **R²M sensitivity**: mean ID AUC over the rank_ratio × α grid spans {ids[worst]:.3f} "
                   f"({worst}) to {ids[best]:.3f} ({best}); the headline uses the package default, not the best "
                   "cell (choosing the best cell would tune on the test set).")
    return out


def write(out_dir: str, meta: dict, seeds: list[dict], plots: bool = True) -> None:
    st = summary_stats(seeds)
    cfg = meta["config"]
    n = len(seeds)
    lines = [f"# Detector benchmark — configuration `{cfg['name']}`", ""]
    if cfg["name"] != "full":
        lines += [f"> **This is the `{cfg['name']}` configuration, not the full benchmark.**", ""]
    lines += [
        f"Seeds: {meta.get('seeds_done')} ({n} of {len(cfg['seeds'])} planned). Patches {cfg['size']}×{cfg['size']}, "
        f"{cfg['steps']} steps × batch {cfg['batch_size']} per specialist, joint {cfg['steps'] * len(ID)} steps. "
        f"Test set per seed: {cfg['n_test_real']} real and {cfg['n_test_fake']} fake patches per family, from "
        f"source images never used in training. Wall time {meta.get('total_seconds', 0) / 60:.1f} min on "
        f"{meta['threads']} threads (torch {meta['torch']}). Command: `{meta['command']}`.",
        "",
        *([f"Trained specialists and joint models were loaded from an earlier run of this configuration "
           f"(`--reuse-training`, seeds {[s['seed'] for s in seeds if s.get('reused_training')]}); the merges and "
           "every evaluation were redone. Training times in the Time table are then load times.", ""]
          if any(s.get("reused_training") for s in seeds) else []),
        "AUC (real vs each forgery family), mean ± std over seeds. * = held-out family no specialist saw.", "",
        "## Headline", "",
        *_table_families(st["rows"]), "",
        "## What the numbers show", "", *plain_summary(seeds), "",
    ]
    unavailable = {m: e for s in seeds for m, e in s["unavailable"].items()}
    if unavailable:
        lines += ["## Unavailable methods", ""] + [f"- `{m}`: {e}" for m, e in unavailable.items()] + [""]
    if st["lofo"]:
        lines += ["## Leave-one-family-out and add-a-specialist", "",
                  "Left-out AUC: merge the 4 other specialists, score the family none of them saw. "
                  "Add-a-specialist: the 4-merge, then the 5th added by re-merging (the 5-merge); "
                  "numbers averaged over which family is the 5th.", "",
                  "| method | " + " | ".join(f"left out: {SHORT[f]}" for f in ID) +
                  " | mean left-out | old 4: 4-merge → 5-merge | new one: 4-merge → 5-merge |",
                  "|" + "---|" * (len(ID) + 4)]
        for m, r in st["lofo"].items():
            cells = [_fmt([s["lofo"][m][f][f] for s in seeds]) for f in ID]
            lines.append(f"| {LABEL[m]} | " + " | ".join(cells) + f" | **{_fmt([np.mean([s['lofo'][m][f][f] for f in ID]) for s in seeds])}** | "
                         f"{r['old_before'][0]:.3f} → {r['old_after'][0]:.3f} | {r['left_out'][0]:.3f} → {r['new_after'][0]:.3f} |")
        lines.append("")
    sweep = _sweep_table(seeds, "r2m_sweep", "R²M setting")
    if sweep:
        lines += ["## R²M sweep (rank_ratio × alpha; rank_ratio 1.0 = no truncation)", "", *sweep, ""]
    if seeds[0].get("ablations"):
        lines += ["## Ablations", "",
                  "Headline rows for reference: R²M averages the head; the baselines apply their own rule to "
                  "every tensor, head included. Conv kernels go to every merge as (out, in·kh·kw) matrices "
                  "(identical results for every method but TSV-M, which decomposes 2-D tensors only).", "",
                  *_sweep_table(seeds, "ablations", "variant"), ""]
    ta = _sweep_table(seeds, "ta_sweep", "task arithmetic")
    if ta:
        lines += ["## Task arithmetic λ", "", *ta, ""]
    times = {m: _ms([s["merge_seconds"][m] for s in seeds if m in s["merge_seconds"]]) for m in MERGES
             if any(m in s["merge_seconds"] for s in seeds)}
    # One column per seed: a seed whose training was loaded (--reuse-training) is marked, its training
    # rows are load + evaluation times, not training times.
    heads = [f"seed {s['seed']}" + (" (training loaded)" if s.get("reused_training") else "") for s in seeds]
    lines += ["## Time", "", "Seconds, wall clock, on a 2-core machine shared with other jobs.", "",
              "| step | " + " | ".join(heads) + " |", "|---|" + "---|" * len(seeds)]
    names = {"specialists_s": "5 specialists (train + evaluate)", "joint_s": "joint model (train + evaluate)",
             "merges_and_eval_s": "all merges + evaluations", "seed_s": "whole seed (with data)"}
    for key, label in names.items():
        lines.append(f"| {label} | " + " | ".join(f"{s['times'][key]:.0f}" for s in seeds) + " |")
    lines += ["", "| merge (5 specialists, 2.2 M params) | seconds (mean over seeds) |", "|---|---|"]
    lines += [f"| {m} | {t[0]:.2f} |" for m, t in times.items()]
    lines += ["", "Forgery strengths: " + ", ".join(f"{k}={v}" for k, v in meta["strength"].items()) + ".", ""]
    if plots:
        lines += ["## Plots", "", "![mean AUC](detector_mean_auc.png)", "", "![per family](detector_per_family.png)", ""]
        if st["lofo"]:
            lines += ["![LOFO](detector_lofo.png)", ""]
        if seeds[0]["r2m_sweep"]:
            lines += ["![sweep](detector_r2m_sweep.png)", ""]
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines))
    if plots:
        _plots(out_dir, seeds, st)


def _plots(out_dir: str, seeds, st) -> None:
    # matplotlib's font cache goes to the repo's ignored build/ folder, not the user's home.
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.environ.setdefault("MPLCONFIGDIR", os.path.join(repo, "build", "detector-mplconfig"))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, stats = st["rows"], st["stats"]
    names = [n for n in ("base", "joint") + MERGES if n in stats]
    short = {"base": "base", "joint": "joint", "average": "avg", "task_arithmetic": "TA", "ties": "TIES",
             "tsvm": "TSV-M", "r2m": "R²M", "oracle": "specialists"}

    fig, ax = plt.subplots(figsize=(7, 3.4))
    x = np.arange(len(names))
    for off, kind, lab in ((-0.2, "id", "in-distribution (5 families)"), (0.2, "ho", "held-out (4 families)")):
        ax.bar(x + off, [stats[n][kind][0] for n in names], 0.4, yerr=[stats[n][kind][1] for n in names],
               label=lab, capsize=3)
    ax.axhline(stats["oracle"]["id"][0], color="k", ls="--", lw=1, label="specialists on own family")
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set_xticks(x, [short[n] for n in names])
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel(f"mean AUC (± std, {len(seeds)} seeds)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "detector_mean_auc.png"), dpi=90)
    plt.close(fig)

    fams = list(ID) + list(HO)
    names2 = [n for n in ("base", "oracle", "joint") + MERGES if n in rows]
    grid = np.array([[np.mean([r.get(f, np.nan) for r in rows[n]]) for f in fams] for n in names2])
    fig, ax = plt.subplots(figsize=(8, 3.6))
    im = ax.imshow(grid, vmin=0.4, vmax=1.0, cmap="viridis", aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="w" if grid[i, j] < 0.75 else "k")
    ax.set_xticks(range(len(fams)), [SHORT[f] for f in fams], rotation=30, fontsize=8)
    ax.set_yticks(range(len(names2)), [short[n] for n in names2], fontsize=8)
    ax.axvline(len(ID) - 0.5, color="w", lw=2)
    fig.colorbar(im, ax=ax, label="AUC")
    ax.set_title("AUC per family (mean over seeds; * held out)", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "detector_per_family.png"), dpi=90)
    plt.close(fig)

    if st["lofo"]:
        ms = list(st["lofo"])
        fig, ax = plt.subplots(figsize=(7, 3.2))
        x = np.arange(len(ms))
        series = (("left_out", "left-out family (4-merge)"), ("new_after", "same family once added (5-merge)"),
                  ("old_before", "old 4 families, 4-merge"), ("old_after", "old 4 families, 5-merge"))
        for k, (key, lab) in enumerate(series):
            ax.bar(x + (k - 1.5) * 0.2, [st["lofo"][m][key][0] for m in ms], 0.2,
                   yerr=[st["lofo"][m][key][1] for m in ms], label=lab, capsize=2)
        ax.axhline(0.5, color="grey", lw=0.8)
        ax.set_xticks(x, [short[m] for m in ms])
        ax.set_ylim(0.4, 1.0)
        ax.set_ylabel("mean AUC")
        ax.set_title("Leave-one-family-out and add-a-specialist", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "detector_lofo.png"), dpi=90)
        plt.close(fig)

    if seeds[0]["r2m_sweep"]:
        cells = list(seeds[0]["r2m_sweep"])
        rrs = sorted({c.split(",")[0].split("=")[1] for c in cells}, key=float)
        als = sorted({c.split(",")[1].split("=")[1] for c in cells}, key=float)
        fig, axes = plt.subplots(1, 2, figsize=(7, 2.8))
        for ax, fam_set, title in ((axes[0], ID, "mean ID AUC"), (axes[1], HO, "mean held-out AUC")):
            g = np.array([[np.mean([mean_over(s["r2m_sweep"][f"rank_ratio={r},alpha={a}"], fam_set) for s in seeds])
                           for a in als] for r in rrs])
            im = ax.imshow(g, cmap="viridis", aspect="auto")
            for i in range(len(rrs)):
                for j in range(len(als)):
                    ax.text(j, i, f"{g[i, j]:.3f}", ha="center", va="center", fontsize=7, color="w")
            ax.set_xticks(range(len(als)), als)
            ax.set_yticks(range(len(rrs)), rrs)
            ax.set_xlabel("alpha")
            ax.set_ylabel("rank_ratio")
            ax.set_title(f"R²M: {title}", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "detector_r2m_sweep.png"), dpi=90)
        plt.close(fig)
