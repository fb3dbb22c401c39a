"""Hash every output tensor of a fixed set of merges, to prove a refactor changes no number.

    python scripts/check_bit_identical.py OUT.json            # run the merges, write the hashes
    python scripts/check_bit_identical.py OUT.json --compare BEFORE.json   # and diff against a run

Run it on the commit before a change and after it: identical JSON means identical outputs bit for
bit (each tensor hashed with its dtype and shape). The cases go through public entry points only
(r2m_fast.merge, merge_files, the incremental API, the r2m-merge command line), so the script runs
unchanged on both sides of a refactor. The Triton case needs TRITON_INTERPRET=1 in the environment
(it is read when the kernels are decorated): without it the case is recorded as skipped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the small model families of the test suite

import r2m_fast  # noqa: E402
from models import gapped_family, model_family  # noqa: E402
from r2m_fast import incremental  # noqa: E402
from r2m_fast.config import R2MConfig  # noqa: E402


def tensor_hash(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def hashes(state_dict) -> dict[str, str]:
    return {name: tensor_hash(t) for name, t in sorted(state_dict.items())}


def folder_hashes(folder: Path) -> dict[str, str]:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return hashes(tensors)


def save(models, folder: Path) -> list[str]:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, sd in enumerate(models):
        path = folder / f"m{i}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        paths.append(str(path))
    return paths


def cases(tmp: Path) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    fam = model_family(3, seed=1)
    fam16 = model_family(2, dtype=torch.bfloat16, seed=2)
    config = R2MConfig(rank_ratio=0.25, backend="torch")

    out["r2m_torch_fp32"] = hashes(r2m_fast.merge(fam[0], fam[1:], config).state_dict)
    out["r2m_torch_bf16"] = hashes(r2m_fast.merge(fam16[0], fam16[1:], config.replace(power_iters=2)).state_dict)
    out["r2m_torch_full_rank"] = hashes(r2m_fast.merge(fam[0], fam[1:], config.replace(rank_ratio=None)).state_dict)
    spill = tmp / "spill"
    spill.mkdir()
    out["r2m_torch_spill"] = hashes(r2m_fast.merge(fam[0], fam[1:], config, spill_dir=spill).state_dict)
    out["r2m_auto_cpu_k2"] = hashes(r2m_fast.merge(fam[0], fam[1:], R2MConfig(rank_ratio=0.25, k_real=2)).state_dict)
    for method, options in (("average", {}), ("task_arithmetic", {"scaling": 0.4}), ("ties", {"density": 0.3}),
                            ("tsvm", {})):
        out[f"baseline_{method}"] = hashes(r2m_fast.merge(fam[0], fam[1:], method=method, **options).state_dict)

    # Incremental, in memory: a merge of 2 with its state, add the third, remove the first.
    result, state = incremental.merge_with_state(fam[0], fam[1:3], config)
    out["incremental_merge"] = hashes(result.state_dict)
    added, state3 = incremental.add_specialist(state, fam[0], fam[1:3], fam[3])
    out["incremental_add"] = hashes(added.state_dict)
    removed, _ = incremental.remove_specialist(state3, fam[0], fam[1:4], 0)
    out["incremental_remove"] = hashes(removed.state_dict)

    # On disk: merge_files (with and without spill), and the command line with --save-state, add, remove.
    paths = save(fam, tmp / "in")
    r2m_fast.merge_files(paths[0], paths[1:], tmp / "files", config)
    out["files_r2m"] = folder_hashes(tmp / "files")
    r2m_fast.merge_files(paths[0], paths[1:], tmp / "files_spill", config, spill_dir=spill)
    out["files_r2m_spill"] = folder_hashes(tmp / "files_spill")
    r2m_fast.merge_files(paths[0], paths[1:], tmp / "files_ties", method="ties", options={"density": 0.5})
    out["files_ties"] = folder_hashes(tmp / "files_ties")
    from r2m_fast.cli import main

    common = ["--quiet", "--backend", "torch", "--rank-ratio", "0.25"]
    assert main(["--base", paths[0], "--specialist", paths[1], "--specialist", paths[2],
                 "--output", str(tmp / "cli"), "--save-state", *common]) == 0
    out["cli_save_state"] = folder_hashes(tmp / "cli")
    assert main(["add", "--state", str(tmp / "cli"), "--specialist", paths[3], "--output", str(tmp / "cli_add"),
                 "--quiet"]) == 0
    out["cli_add"] = folder_hashes(tmp / "cli_add")
    assert main(["remove", "--state", str(tmp / "cli_add"), "--index", "1", "--output", str(tmp / "cli_remove"),
                 "--quiet"]) == 0
    out["cli_remove"] = folder_hashes(tmp / "cli_remove")

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        gapped = gapped_family(2, 83, 61, seed=5)
        tconfig = R2MConfig(rank_ratio=0.2, backend="triton")
        out["r2m_triton_interpreter"] = hashes(r2m_fast.merge(gapped[0], gapped[1:], tconfig).state_dict)
        small = model_family(2, seed=3, with_buffer=False)
        out["r2m_triton_interpreter_family"] = hashes(r2m_fast.merge(small[0], small[1:], tconfig).state_dict)
    else:
        out["r2m_triton_interpreter"] = {"skipped": "TRITON_INTERPRET is not set"}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="JSON file to write the hashes to")
    parser.add_argument("--compare", metavar="BEFORE.json", help="exit 1 unless the hashes equal this file's")
    args = parser.parse_args()
    torch.set_num_threads(1)  # BLAS blocking depends on the thread count: fix it
    with tempfile.TemporaryDirectory() as tmp:
        result = cases(Path(tmp))
    Path(args.output).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    tensors = sum(len(v) for v in result.values())
    print(f"{len(result)} cases, {tensors} tensor hashes -> {args.output}")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        differ = sorted(k for k in set(before) | set(result) if before.get(k) != result.get(k))
        if differ:
            print(f"DIFFERENT: {', '.join(differ)}")
            return 1
        print(f"identical to {args.compare}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
