"""The end-to-end fast paths (issue 14): chunked float64 baselines, mapped reads kept resident or
streamed, layers on worker threads, the background writer, and a dry run that measures."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

import r2m_fast
import r2m_fast.baselines as baselines
from helpers import merge_flags as flags
from r2m_fast.cli import main
from r2m_fast.sources import DictSource
from r2m_fast.inputs import FileSource
from r2m_fast.pipeline import RESIDENT_ENV, BackgroundSink, one_thread_per_worker, ordered_map, resident_fits

from models import model_family
from test_baselines import average_ref, task_arithmetic_ref, ties_ref


@pytest.fixture(params=[1, 2], ids=["threads=1", "threads=2"])
def small_chunks(request, monkeypatch):
    """Chunks of 7 elements: every tensor spans many chunks, most ragged, over 1 or 2 workers."""
    monkeypatch.setattr(baselines, "CHUNK", 7)
    monkeypatch.setattr(baselines, "LINEAR_CHUNK", 5)
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("method,ref,options", [
    ("average", average_ref, {}),
    ("task_arithmetic", task_arithmetic_ref, {"scaling": 0.3}),
    ("ties", ties_ref, {"density": 0.2, "scaling": 1.0}),
])
def test_baselines_are_the_float64_reference_rounded_once(small_chunks, dtype, method, ref, options):
    """Bit for bit the float64 reference rounded to the output dtype; bf16 task vectors take few
    distinct values, so TIES meets many ties at its trim threshold (kept in index order)."""
    models = model_family(3, dtype=dtype, with_buffer=False)
    result = baselines.run_baseline(DictSource(models[0], models[1:]), method, options)
    for name, out in result.state_dict.items():
        want = ref(models, name, **options).to(dtype)
        assert torch.equal(out, want), f"{method} {name}"


def test_overflow_of_the_merged_value_names_the_tensor():
    models = model_family(2, dtype=torch.float16, with_buffer=False)
    models = [{k: v.clone() for k, v in m.items()} for m in models]
    models[1]["blocks.0.mlp.fc1.weight"][0, 0] = 60000.0
    models[2]["blocks.0.mlp.fc1.weight"][0, 0] = 60000.0
    with pytest.raises(r2m_fast.MergeInputError, match=r"blocks.0.mlp.fc1.weight.*overflows"):
        r2m_fast.merge(models[0], models[1:], method="task_arithmetic", scaling=2.0)


def test_ordered_map_keeps_order_and_raises():
    with one_thread_per_worker(2):
        assert list(ordered_map(lambda x: x * x, ((i,) for i in range(9)), 2)) == [i * i for i in range(9)]

    def boom(x):
        if x == 4:
            raise ValueError("layer 4")
        return x

    with pytest.raises(ValueError, match="layer 4"):
        list(ordered_map(boom, ((i,) for i in range(9)), 2))


def test_background_sink_writes_in_order_and_reraises():
    got = []
    with BackgroundSink(lambda name, t: got.append(name)) as sink:
        for i in range(5):
            sink(f"t{i}", torch.zeros(1))
    assert got == [f"t{i}" for i in range(5)]

    def fail(name, tensor):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with BackgroundSink(fail) as sink:
            sink("a", torch.zeros(1))


def test_resident_decision_and_override(monkeypatch):
    monkeypatch.delenv(RESIDENT_ENV, raising=False)
    assert resident_fits(10, available=100) and not resident_fits(90, available=100)
    monkeypatch.setenv(RESIDENT_ENV, "0")
    assert not resident_fits(1, available=100)
    monkeypatch.setenv(RESIDENT_ENV, "1")
    assert resident_fits(10**15, available=100)


@pytest.mark.parametrize("method", ["r2m", "average"])
def test_resident_and_streamed_inputs_give_the_same_merge(tmp_path, inputs, family, monkeypatch, method):
    outputs = {}
    for resident in ("1", "0"):
        monkeypatch.setenv(RESIDENT_ENV, resident)
        out = tmp_path / f"out{resident}"
        assert main(flags(inputs, out) + ["--method", method]) == 0
        outputs[resident] = load_file(str(out / "model.safetensors"))
        report = json.loads((out / "merge_report.json").read_text())
        assert report["resident_inputs"] is (resident == "1" and method == "r2m")
        assert report["fsync"] is False
    assert sorted(outputs["1"]) == sorted(outputs["0"])
    for name in outputs["1"]:
        assert torch.equal(outputs["1"][name], outputs["0"][name]), name
    want = r2m_fast.merge(family[0], family[1:], method=method).state_dict
    for name in want:
        assert torch.equal(outputs["0"][name], want[name]), name


def test_streamed_source_releases_all_but_the_last_layers(inputs, monkeypatch):
    """Streaming, only the last KEEP_MAPPED layers stay mapped: the others are released."""
    monkeypatch.setattr(FileSource, "KEEP_MAPPED", 2)
    released = []
    with FileSource(inputs[0], inputs[1:]) as source:
        for checkpoint in source._checkpoints:
            checkpoint.release = lambda name, c=checkpoint: released.append(name)
        names = list(source.specs())
        for name in names:
            views = source.load(name)
            assert torch.equal(views[0], load_file(str(inputs[0]))[name])
    assert len(names) > 4 and released == [n for n in names[:-2] for _ in inputs]


def _bytes(printed: str) -> float:
    number, unit = printed.split()
    return float(number) * {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


@pytest.mark.parametrize("method", ["r2m", "average", "ties"])
def test_dry_run_gives_measured_sane_estimates(tmp_path, inputs, capsys, method):
    assert main(flags(inputs, tmp_path / "out")[:-1] + ["--dry-run", "--method", method]) == 0
    text = capsys.readouterr().out
    size = r"([0-9.]+ [KMG]?B)"
    memory = re.search(rf"estimated peak memory: {size} \(this process now {size};.*largest layer's work {size}", text)
    assert memory, text
    peak, now, work = (_bytes(memory[i]) for i in (1, 2, 3))
    # torch alone is over 50 MB; these inputs are tiny. Printed to three figures, so a process of
    # 1.00 GB and a peak a few MB above it may print alike (CI ran with a 1 GB pytest process).
    assert now > 50e6 and work > 0 and now <= peak < now + 1e9 and peak >= (now + work) * (1 - 5e-3)
    seconds = float(re.search(r"estimated time: ([0-9.]+) s", text)[1])
    assert 0 < seconds < 600
    assert ("inputs resident between passes" in text) == (method == "r2m")
    assert not (tmp_path / "out").exists()


def test_dry_run_probes_the_models_dtype_as_the_merge_runs(monkeypatch):
    """The elementwise probe runs on the dtype holding most of the model (a bf16 model's elements are
    cheaper to read), and the GEMM probe one product per layer worker, as pass 2 does."""
    from r2m_fast import estimate

    specs = {"a": ((4, 1000), torch.bfloat16), "b": ((10,), torch.float32), "c": ((7,), torch.int64)}
    assert estimate.main_dtype(specs) == torch.bfloat16
    assert estimate.main_dtype({"c": ((7,), torch.int64)}) == torch.float32
    seen = []
    real = baselines._linear_cpu
    monkeypatch.setattr(estimate, "PROBE_ELEMENTS", 4096)
    monkeypatch.setattr(baselines, "_linear_cpu", lambda name, tensors, *a: seen.append(tensors[0].dtype) or real(name, tensors, *a))
    assert estimate.probe_elements("average", 3, torch.bfloat16) > 0
    assert set(seen) == {torch.bfloat16}
    assert estimate.probe_gemm(torch.device("cpu"), width=64, cols=8) > 0


def test_workers_build_no_autograd_graph():
    """Grad mode is per thread: inputs that require grad must not make the workers record a graph."""
    models = model_family(3, with_buffer=False)
    models = [{k: v.clone().requires_grad_(True) for k, v in m.items()} for m in models]
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = r2m_fast.merge(models[0], models[1:])
    finally:
        torch.set_num_threads(previous)
    assert all(not t.requires_grad and t.grad_fn is None for t in result.state_dict.values())
