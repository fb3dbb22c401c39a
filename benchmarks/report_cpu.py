"""Turn a pytest-benchmark JSON of test_bench_cpu.py into the side-by-side ratio table (markdown)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str) -> None:
    data = json.loads(Path(path).read_text())
    machine = data["machine_info"]
    rows: dict[str, dict[str, dict]] = {}
    for bench in data["benchmarks"]:
        rows.setdefault(bench["group"], {})[bench["extra_info"]["provider"]] = bench
    lines = [
        f"# CPU benchmark: ViT-B/16 shapes (12 blocks, width 768), rank_ratio 0.1",
        "",
        f"- date: {data['datetime']}",
        f"- machine: {machine.get('cpu', {}).get('brand_raw', machine.get('processor'))}, "
        f"{machine.get('cpu', {}).get('count', '?')} logical cores, {machine['system']} {machine['release']}",
        f"- python {machine['python_version']}, torch {data.get('torch_version', _torch_version())}",
        f"- command: `python -m pytest benchmarks/test_bench_cpu.py --benchmark-json={path}` then "
        f"`python benchmarks/report_cpu.py {path}`",
        "- all providers timed in one run, side by side; times are medians (reference: one round).",
        "- error: ‖θ*−θ*_ref‖/‖θ*_ref−θ₀‖ over the whole model; randomized vs exact truncation on a spectrum "
        "without a gap at r (the per-residual 1.05× contract is tested in tests/test_engine.py).",
        "",
        "| case | reference s | naive svd_lowrank s | fast torch (fp32) s | fast torch (auto: bf16 range finder) s "
        "| fast vs reference | fast vs naive | fp32 fast vs naive | error vs reference (fast / fp32 / naive) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for group, providers in sorted(rows.items()):
        ref = providers["reference"]["stats"]["median"]
        naive = providers["naive_svd_lowrank"]["stats"]["median"]
        fast = providers["fast_torch"]["stats"]["median"]
        fp32 = providers["fast_torch_fp32"]["stats"]["median"]
        errors = " / ".join(
            f"{providers[p]['extra_info']['delta_rel_error']:.2e}"
            for p in ("fast_torch", "fast_torch_fp32", "naive_svd_lowrank")
        )
        lines.append(
            f"| {group} | {ref:.2f} | {naive:.2f} | {fp32:.2f} | {fast:.2f} | {ref / fast:.1f}× | {naive / fast:.2f}× "
            f"| {naive / fp32:.2f}× | {errors} |"
        )
    out = Path(path).with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main(sys.argv[1])
