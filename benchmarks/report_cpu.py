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
        "",
        "| case | reference s | naive svd_lowrank s | fast torch s | fast vs reference | fast vs naive | error vs reference (fast / naive) |",
        "|---|---|---|---|---|---|---|",
    ]
    for group, providers in sorted(rows.items()):
        ref = providers["reference"]["stats"]["median"]
        naive = providers["naive_svd_lowrank"]["stats"]["median"]
        fast = providers["fast_torch"]["stats"]["median"]
        err_fast = providers["fast_torch"]["extra_info"]["delta_rel_error"]
        err_naive = providers["naive_svd_lowrank"]["extra_info"]["delta_rel_error"]
        lines.append(
            f"| {group} | {ref:.2f} | {naive:.2f} | {fast:.2f} | {ref / fast:.1f}× | {naive / fast:.2f}× "
            f"| {err_fast:.2e} / {err_naive:.2e} |"
        )
    out = Path(path).with_suffix(".md")
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


def _torch_version() -> str:
    import torch

    return torch.__version__


if __name__ == "__main__":
    main(sys.argv[1])
