"""Multi-process R²M with torch.distributed: layers sharded across ranks, one merged checkpoint.

    torchrun --nproc-per-node 2 -m r2m_fast.distributed --base B --specialist S1 --specialist S2 --output OUT
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m r2m_fast.distributed CONFIG.yaml --device cuda

Every rank opens the checkpoint headers, builds the same plan and the same assignment of layers to
ranks (largest first, each to the least-loaded rank by bytes: round-robin for equal layers), and reads
only its own layers. The exchanges are tiny and exact:

    after pass 1   the Grams of all merged layers, (L, N, N) fp64: each rank fills its rows, one all-reduce
                   (a sum of one value and zeros is exact, so every rank holds the single-process Grams)
    the solve      rank 0 solves the N×N problem and broadcasts w (one answer even across unlike CPUs)
    after pass 2   each truncated layer's kept σ², (L_trunc, N) fp64, same way; every rank then sums the
                   residual norms in plan order, as the single-process engine does

so the merged tensors are bit-identical to a single-process merge on the same backend, device and
thread count (tested with 2 gloo ranks). Each rank writes its own shards into a temporary folder beside
the output; rank 0 renames them model-0000i-of-0000n.safetensors, writes the index, the config and the
report, and moves the folder into place. The output's parent must be on a filesystem every rank sees.
Errors on any rank are exchanged at each step, so every rank stops with the first rank's message
instead of hanging in a collective. NCCL on CUDA devices (device = cuda:LOCAL_RANK), gloo on CPU.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence, TypeVar, Union

import torch
import torch.distributed as dist

from r2m_fast.backends import resolve_backend
from r2m_fast.config import R2MConfig
from r2m_fast.engine import MergeState, Sink, new_state, run_passes
from r2m_fast.factors import RealSubspace
from r2m_fast.plan import DECOMPOSED, LayerPlan
from r2m_fast.result import MergeResult
from r2m_fast.sources import LayerSource

if TYPE_CHECKING:
    from r2m_fast.spill import Spill

T = TypeVar("T")
PathLike = Union[str, "os.PathLike[str]"]
DEFAULT_TIMEOUT_S = 1800


class RankFailed(RuntimeError):
    """Another rank of the merge failed; the message is that rank's error."""


def assign_layers(plan: Sequence[LayerPlan], world_size: int) -> dict[str, int]:
    """Layer name → rank: largest first (bytes of one model's tensor), each to the least-loaded rank,
    ties to the lowest rank. Depends only on the plan, so every rank computes the same assignment."""
    loads = [0] * world_size
    owner = {}
    order = sorted(range(len(plan)), key=lambda i: (-plan[i].numel * plan[i].dtype.itemsize, i))
    for i in order:
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owner[plan[i].name] = rank
        loads[rank] += plan[i].numel * plan[i].dtype.itemsize
    return owner


class Comm:
    """The Exchange (r2m_fast.engine) of a merge over the ranks of a process group: the few
    collectives a sharded merge needs, with errors exchanged instead of hangs."""

    def __init__(self, group: Optional[dist.ProcessGroup] = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.leader = self.rank == 0
        # NCCL reduces CUDA tensors only; the exchanged tensors are KB-sized, the copy is free.
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.backend = str(dist.get_backend(group))

    def run(self, fn: Callable[[], T]) -> T:
        """fn() on this rank; if any rank raised, every rank raises (its own error, or RankFailed)."""
        error: Optional[BaseException] = None
        value = None
        try:
            value = fn()
        except Exception as exc:  # KeyboardInterrupt ends the process; torchrun stops the others
            error = exc
        messages: list[Optional[str]] = [None] * self.world
        text = None if error is None else (f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}")
        dist.all_gather_object(messages, text, group=self.group)
        if error is not None:
            raise error
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed:
            rank, message = failed[0]
            raise RankFailed(f"rank {rank} failed: {message}")
        return value  # type: ignore[return-value]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce SUM of a CPU tensor whose entries only one rank fills: exact."""
        work = tensor.to(self.device)
        dist.all_reduce(work, op=dist.ReduceOp.SUM, group=self.group)
        return work.cpu()

    def broadcast(self, obj: T, src: int = 0) -> T:
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    # The Exchange of r2m_fast.engine.run_passes

    def local_state(self, state: MergeState, spill: Optional["Spill"]) -> MergeState:
        owner = assign_layers(state.plan, self.world)
        return MergeState(
            plan=[layer for layer in state.plan if owner[layer.name] == self.rank],
            range_finder_dtype=state.range_finder_dtype,
            spill=spill,
        )

    def share_grams(self, state: MergeState, local: MergeState, N: int) -> None:
        merged = [layer.name for layer in state.plan if layer.merged]
        state.grams = self._sum_by_name(merged, local.grams, (N, N))

    def solve(self, fn: Callable[[], RealSubspace]) -> RealSubspace:
        # Rank 0 alone: one answer even across unlike CPUs.
        return self.broadcast(self.run(lambda: fn() if self.rank == 0 else None))

    def share_kept(self, plan: Sequence[LayerPlan], kept: Mapping[str, torch.Tensor], N: int) -> Mapping[str, torch.Tensor]:
        truncated = [layer.name for layer in plan if layer.rank is not None and layer.kind == DECOMPOSED]
        return self._sum_by_name(truncated, kept, (N,))

    def _sum_by_name(self, names: Sequence[str], mine: Mapping[str, torch.Tensor],
                     shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """Every rank's fp64 values of `names` (each held by one rank: `mine` has this rank's), in one
        exact all-reduce."""
        table = torch.zeros(len(names), *shape, dtype=torch.float64)
        for i, name in enumerate(names):
            if name in mine:
                table[i] = mine[name]
        table = self.sum(table)
        return {name: table[i] for i, name in enumerate(names)}

    def finish_report(self, report: dict, local: MergeState, seconds: Mapping[str, float], start: float) -> None:
        mine = {
            "layers": len(local.plan),
            "bytes_per_model": sum(layer.numel * layer.dtype.itemsize for layer in local.plan),
            "pass_seconds": dict(seconds),
            "seconds": time.perf_counter() - start,
            **(local.spill.report() if local.spill is not None else {}),
        }
        ranks = self.gather(mine)
        report["distributed"] = {"world_size": self.world, "comm_backend": self.backend, "ranks": ranks}
        report["seconds"] = max(r["seconds"] for r in ranks)
        if local.spill is not None:  # over all ranks (the peak: an upper bound of what they hold at once)
            report["spill_bytes"] = sum(r["spill_bytes"] for r in ranks)
            report["spill_peak_bytes"] = sum(r["spill_peak_bytes"] for r in ranks)


@torch.no_grad()
def merge_distributed(
    source: LayerSource,
    config: R2MConfig,
    sink: Optional[Sink] = None,
    progress: bool = False,
    group: Optional[dist.ProcessGroup] = None,
    spill_dir: Optional[PathLike] = None,
) -> MergeResult:
    """R²M over a LayerSource on every rank of `group` (initialized): each rank merges its layers
    (assign_layers) into `sink`, or into the returned state_dict when no sink is given. Every rank
    returns the same report (global norms, η, eigenvalues) plus ``distributed`` (per-rank layers,
    bytes and pass seconds). `spill_dir`: each rank keeps its sketches and factors in a temporary
    folder of its own there (r2m_fast.spill) instead of memory."""
    start = time.perf_counter()
    comm = Comm(group)
    backend = resolve_backend(config.backend, source.device)
    state = comm.run(lambda: new_state(source, config, backend))
    return run_passes(source, state, config, backend, exchange=comm, sink=sink, progress=progress,
                      spill_dir=spill_dir, start=start)


def merge_files_distributed(
    base: PathLike,
    specialists: Sequence[PathLike],
    output: PathLike,
    config: Optional[R2MConfig] = None,
    *,
    prefix: Optional[str] = None,
    device: Optional[Union[str, torch.device]] = None,
    shard_size: Union[int, str] = "5GB",
    force: bool = False,
    progress: bool = False,
    group: Optional[dist.ProcessGroup] = None,
    spill_dir: Optional[PathLike] = None,
) -> MergeResult:
    """r2m_fast.merge_files on every rank of an initialized process group: same output folder layout
    (shards + model.safetensors.index.json, merge_config.yaml, merge_report.json, model files),
    written through the same transaction (r2m_fast.output.OutputFolder), which rank 0 opens and
    commits; each rank writes its shards into a sub-folder of it. `spill_dir`: as for merge_distributed."""
    from r2m_fast.inputs import FileSource
    from r2m_fast.output import (
        OutputFolder, ShardedSafetensorsWriter, check_output_apart, finish_folder, needed_bytes, output_layout,
        shard_names, sigterm_cleans_up,
    )
    from r2m_fast.plan import build_plan

    config = config or R2MConfig()
    comm = Comm(group)
    started = time.time()
    t0 = time.perf_counter()
    with sigterm_cleans_up(), comm.run(lambda: FileSource(base, specialists, device=device, prefix=prefix)) as source:
        specs = source.specs()
        layout_all = output_layout(specs, config.out_dtype)
        folder = OutputFolder(output, force=force, needed=needed_bytes(layout_all, shard_size))

        def open_folder() -> Optional[str]:
            if comm.rank != 0:
                return None
            check_output_apart(output, [base, *specialists])
            return str(folder.__enter__().path)

        root = Path(comm.broadcast(comm.run(open_folder)))
        try:
            def own_folder() -> Path:
                if not root.is_dir():
                    raise RuntimeError(f"{root} is not visible here: the output folder must be on a filesystem every rank shares")
                mine = root / f"rank-{comm.rank:05d}"
                try:
                    mine.mkdir()
                except OSError as exc:
                    raise folder.fail(exc) from exc
                return mine

            mine = comm.run(own_folder)
            plan = build_plan(specs, config)
            owner = assign_layers(plan, comm.world)
            layout = output_layout({layer.name: specs[layer.name] for layer in plan if owner[layer.name] == comm.rank},
                                   config.out_dtype)
            writer = ShardedSafetensorsWriter(mine, layout, shard_size=shard_size, on_error=folder.fail)
            result = merge_distributed(source, config, sink=writer, progress=progress, group=group, spill_dir=spill_dir)
            comm.run(writer.close)
            written = comm.gather({"files": writer.files if layout else [],
                                   "shards": [[name for name, _, _ in shard] for shard in writer.shards] if layout else []})

            def finish() -> Optional[dict]:
                if comm.rank != 0:
                    return None
                # Every rank's shards, in rank order, take the Hugging Face names of the whole output.
                moves = [(root / f"rank-{r:05d}" / file, names) for r, info in enumerate(written)
                         for file, names in zip(info["files"], info["shards"])]
                weight_map = {}
                try:
                    for (path, names), name in zip(moves, shard_names(len(moves))):
                        os.rename(path, root / name)
                        weight_map.update((n, name) for n in names)
                    for r in range(comm.world):
                        os.rmdir(root / f"rank-{r:05d}")
                except OSError as exc:
                    raise folder.fail(exc) from exc
                report = finish_folder(folder, result, base=base, specialists=specialists, layout=layout_all,
                                       weight_map=weight_map, config=config, prefix=prefix, shard_size=shard_size,
                                       device=device, started=started, t0=t0, run_config_extra={"nproc": comm.world})
                folder.commit()
                return report

            report = comm.broadcast(comm.run(finish))
        finally:
            if comm.rank == 0:
                folder.abort()
    result.report = report
    return result


def init_from_env(device: Optional[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, ...): NCCL and
    cuda:LOCAL_RANK when `device` names CUDA, gloo on CPU. Returns this rank's compute device."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device is not None and str(device).startswith("cuda")
    if cuda:
        compute = torch.device("cuda", local_rank)
        torch.cuda.set_device(compute)
    else:
        compute = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {"device_id": compute} if cuda else {}
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return compute


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``torchrun ... -m r2m_fast.distributed`` with r2m-merge's flags and YAML (method r2m)."""
    from r2m_fast import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = cli.build_parser()
    parser.prog = "torchrun --nproc-per-node N -m r2m_fast.distributed"
    parser.add_argument("--dist-timeout", type=cli.number(0, open_minimum=True), default=DEFAULT_TIMEOUT_S,
                        help=f"seconds a rank waits for the others before failing ({DEFAULT_TIMEOUT_S})")
    args = parser.parse_args(argv)
    prog = "r2m_fast.distributed"

    settings: dict = {}

    def check() -> int:  # every value before any work (or any process group): exit 2 with one line
        try:
            settings.update(cli.resolve(args))
        except ValueError as exc:
            raise cli.CommandError(str(exc)) from None
        if settings["method"] != "r2m" or args.example or args.dry_run:
            raise cli.CommandError("the distributed merge runs method r2m only, without --example or --dry-run")
        return 0

    code = cli.run_command(prog, check, debug=args.debug)
    if code != 0:
        return code
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = init_from_env(settings.get("device"), args.dist_timeout)
    rank = dist.get_rank()
    from r2m_fast.io import allowing_safe_globals

    def merge() -> int:
        with allowing_safe_globals(bool(settings.get("allow_safe_globals"))):
            result = merge_files_distributed(
                settings["base"], settings["specialists"], settings["output"], settings["config"],
                prefix=settings.get("prefix"), device=device, shard_size=settings.get("shard_size") or "5GB",
                force=args.force, progress=not args.quiet, spill_dir=settings.get("spill_dir"),
            )
        if rank == 0 and not args.quiet:
            r = result.report
            print(f"{prog}: merged {len(r['inputs']['specialists'])} specialists on {r['distributed']['world_size']} "
                  f"ranks ({r['distributed']['comm_backend']}) into {r['output']} in {r['timings']['total_seconds']:.2f} s")
        return 0

    try:
        return cli.run_command(f"{prog}: rank {rank}", merge, debug=args.debug)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
