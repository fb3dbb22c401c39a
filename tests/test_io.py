"""Checkpoint I/O: every input format, the streamed merge equal to the in-memory API bit for bit,
the atomic sharded writer, and the input errors (each naming the file and the tensor)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import r2m_fast
from r2m_fast.inputs import FileSource
from r2m_fast.io import PickleCheckpoint, load_state_dict, open_checkpoint, parse_size
from r2m_fast.output import OutputFolder, ShardedSafetensorsWriter, output_layout
from r2m_fast.plan import MergeInputError

from helpers import has_written_tensors
from models import model_family

CONFIG = r2m_fast.R2MConfig(head_prefix="head.", rank_ratio=0.2, seed=3)



def write_safetensors(folder: Path, models, stem="m") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, sd in enumerate(models):
        paths.append(folder / f"{stem}{i}.safetensors")
        save_file(sd, str(paths[-1]))
    return paths


def write_hf_sharded(folder: Path, sd, shards: int = 3) -> Path:
    """A Hugging Face style folder: shards by the safetensors library plus an index."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(sd)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k] for k in part}, str(folder / file))
        weight_map.update({k: file for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def assert_same(a, b):
    assert list(a) == list(b) or sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def in_memory(family, config=CONFIG, **kw):
    return r2m_fast.merge(family[0], family[1:], config, **kw).state_dict


# --- input formats -------------------------------------------------------------------------------


def _formats(tmp: Path, family):
    """Each input format holding the family: (label, [base, specialists...], prefix)."""
    out = {}
    out["safetensors"] = (write_safetensors(tmp / "st", family), None)
    out["hf_sharded"] = ([write_hf_sharded(tmp / f"hf{i}", sd) for i, sd in enumerate(family)], None)
    single = []
    for i, sd in enumerate(family):
        (tmp / f"hs{i}").mkdir()
        save_file(sd, str(tmp / f"hs{i}" / "model.safetensors"))
        single.append(tmp / f"hs{i}")
    out["hf_single"] = (single, None)
    bins = []
    for i, sd in enumerate(family):  # transformers' sharded pickle layout
        folder = tmp / f"bin{i}"
        folder.mkdir()
        names = list(sd)
        halves = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
        for file, part in halves.items():
            torch.save({k: sd[k] for k in part}, folder / file)
        weight_map = {k: file for file, part in halves.items() for k in part}
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        bins.append(folder)
    out["bin_sharded"] = (bins, None)
    for kind in ("pt", "wrapped_state_dict", "wrapped_model", "legacy_bin", "prefixed"):
        paths = []
        for i, sd in enumerate(family):
            path = tmp / (f"{kind}{i}.bin" if kind == "legacy_bin" else f"{kind}{i}.pt")
            if kind == "pt":
                torch.save(sd, path)
            elif kind == "wrapped_state_dict":
                torch.save({"epoch": 3, "state_dict": sd, "optimizer": {"lr": 0.1}}, path)
            elif kind == "wrapped_model":
                torch.save({"model": sd, "step": 10}, path)
            elif kind == "legacy_bin":
                torch.save(sd, path, _use_new_zipfile_serialization=False)
            else:  # a detector checkpoint: backbone to merge, plus a neck that is not merged
                wrapped = {f"backbone.{k}": v for k, v in sd.items()}
                wrapped["neck.proj.weight"] = torch.randn(4, 4)
                torch.save({"state_dict": wrapped}, path)
            paths.append(path)
        out[kind] = (paths, "backbone." if kind == "prefixed" else None)
    return out


FORMATS = ["safetensors", "hf_sharded", "hf_single", "bin_sharded", "pt", "wrapped_state_dict", "wrapped_model", "legacy_bin", "prefixed"]


@pytest.fixture(scope="module")
def formats(tmp_path_factory, family):
    return _formats(tmp_path_factory.mktemp("formats"), family)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_back_exactly(formats, family, fmt):
    paths, prefix = formats[fmt]
    assert_same(load_state_dict(paths[1], prefix=prefix), family[1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_streamed_merge_equals_in_memory_bit_for_bit(tmp_path, formats, family, fmt):
    paths, prefix = formats[fmt]
    result = r2m_fast.merge_files(paths[0], paths[1:], tmp_path / "out", CONFIG, prefix=prefix)
    assert_same(load_file(str(tmp_path / "out" / "model.safetensors")), in_memory(family))
    assert result.state_dict == {}
    assert result.report["seed"] == 3 and result.report["method"] == "r2m"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_computed_in_place_equals_in_memory_bit_for_bit(tmp_path, monkeypatch, dtype):
    """merge_files maps its shards and pass 3 computes each tensor at its place in the file, the
    embedding (over twice the median layer) a row block at a time; 2 workers (in place) and the
    in-memory merge (no destination) give the same bits, sharded or not."""
    from models import SHAPES
    from r2m_fast import output

    family = model_family(3, dtype=dtype, shapes={**SHAPES, "embed_tokens.weight": (401, 24)})
    paths = write_safetensors(tmp_path / "in", family)
    places = []  # per tensor written: whether it came computed at its place
    write_in_place = output.ShardedSafetensorsWriter._write_in_place

    def spy(writer, name, tensor):
        place = writer.destination(name)
        places.append(place is None or place.data_ptr() == tensor.data_ptr())
        return write_in_place(writer, name, tensor)

    monkeypatch.setattr(output.ShardedSafetensorsWriter, "_write_in_place", spy)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for shard_size, out in (("5GB", tmp_path / "one"), (12000, tmp_path / "sharded")):
            places.clear()
            r2m_fast.merge_files(paths[0], paths[1:], out, CONFIG, shard_size=shard_size)
            assert len(places) == len(family[0]) and all(places)  # none copied by the writer
            merged = {}
            for file in sorted(out.glob("*.safetensors")):
                merged.update(load_file(str(file)))
            assert_same(merged, in_memory(family))
    finally:
        torch.set_num_threads(previous)


def test_sharded_output_equals_in_memory_and_follows_hf_layout(tmp_path, family):
    paths = write_safetensors(tmp_path / "in", family)
    out = tmp_path / "out"
    r2m_fast.merge_files(paths[0], paths[1:], out, CONFIG, shard_size=4000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    assert not (out / "model.safetensors").exists()
    expected = in_memory(family)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in expected.values())
    merged = {}
    for file in files:  # the safetensors library reads what we wrote
        with safe_open(str(out / file), framework="pt") as f:
            merged.update({k: f.get_tensor(k) for k in f.keys()})
    assert_same(merged, expected)
    assert_same(load_state_dict(out), expected)  # and the output is itself an input
    report = json.loads((out / "merge_report.json").read_text())
    assert report["files"][-1] == "model.safetensors.index.json"
    assert {"r2m_fast", "torch", "python"} <= set(report["versions"])
    assert report["inputs"]["specialists"] == [str(p) for p in paths[1:]]
    assert report["ranks"] and report["timings"]["total_seconds"] > 0
    import yaml

    config = yaml.safe_load((out / "merge_config.yaml").read_text())
    assert config["rank_ratio"] == 0.2 and config["head_prefix"] == "head." and config["seed"] == 3
    assert config["base"] == os.path.abspath(paths[0])


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties", "tsvm"])
def test_streamed_baselines_equal_in_memory(tmp_path, family, method):
    paths = write_safetensors(tmp_path / "in", family)
    r2m_fast.merge_files(paths[0], paths[1:], tmp_path / "out", method=method)
    assert_same(load_file(str(tmp_path / "out" / "model.safetensors")), in_memory(family, None, method=method))


def test_out_dtype_and_bf16_inputs(tmp_path):
    fam = model_family(2, dtype=torch.bfloat16)
    paths = write_safetensors(tmp_path / "in", fam)
    config = CONFIG.replace(out_dtype="float32")
    r2m_fast.merge_files(paths[0], paths[1:], tmp_path / "out", config)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert out["blocks.0.attn.qkv.weight"].dtype == torch.float32
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert_same(out, in_memory(fam, config))


def test_inputs_are_not_modified(tmp_path, family):
    paths = write_safetensors(tmp_path / "in", family)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}
    r2m_fast.merge_files(paths[0], paths[1:], tmp_path / "out", CONFIG)
    assert before == {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths}


def test_pickle_checkpoint_remaps_and_stays_exact(tmp_path, family):
    path = tmp_path / "m.pt"
    torch.save(family[1], path)
    ckpt = PickleCheckpoint(path, [path], None, remap_bytes=1)  # re-open after every tensor
    for name, tensor in family[1].items():
        got = ckpt.get(name)
        assert torch.equal(got, tensor)
        assert got.untyped_storage().data_ptr() != tensor.untyped_storage().data_ptr()


# --- writer --------------------------------------------------------------------------------------


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size(1234) == 1234
    assert parse_size("1.5k") == 1500
    with pytest.raises(ValueError, match="shard_size"):
        parse_size("lots")


def test_no_partial_output_on_error(tmp_path, family):
    paths = write_safetensors(tmp_path / "in", family)
    out = tmp_path / "out"

    class FailingSource(FileSource):
        calls = 0

        def load(self, name):
            FailingSource.calls += 1
            if FailingSource.calls > 25:  # pass 3 is under way: shards are being written
                raise OSError("disk unplugged")
            return super().load(name)

    source = FailingSource(paths[0], paths[1:])
    layout = output_layout(source.specs(), None)
    with pytest.raises(OSError, match="unplugged"):
        with OutputFolder(out) as folder:
            from r2m_fast.engine import run_merge

            writer = ShardedSafetensorsWriter(folder.path, layout, shard_size=1000, on_error=folder.fail)
            run_merge(source, CONFIG, sink=writer)
            writer.close()
            folder.commit()
    assert not out.exists()
    assert os.listdir(tmp_path) == ["in"]  # no temporary folder left either


@pytest.mark.parametrize("fallocate", ["works", "unsupported"])
def test_in_place_writer_writes_what_the_plain_one_does(tmp_path, monkeypatch, fallocate):
    """An in-place writer maps its shards: a tensor computed into its destination is not copied, one
    handed over from elsewhere is, each one's pages leave the process once written, and the shards
    read back bit for bit as the plain writer's (fp32, bf16, an integer buffer, an empty tensor, ragged
    byte sizes across 3 shards). Without fallocate it writes as the plain writer does."""
    gen = torch.Generator().manual_seed(12)
    tensors = {
        "a.weight": torch.randn(33, 17, generator=gen),
        "b.weight": torch.randn(5, 7, generator=gen).bfloat16(),
        "steps": torch.tensor(7),
        "empty": torch.empty(0, 3),
        "c.weight": torch.randn(301, 3, generator=gen).half(),
    }
    layout = [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
    if fallocate == "unsupported":
        def no_fallocate(fd, offset, length):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")

        monkeypatch.setattr(os, "posix_fallocate", no_fallocate)
    written = {}
    for kind in ("plain", "in place"):
        folder = tmp_path / kind.replace(" ", "_")
        folder.mkdir()
        writer = ShardedSafetensorsWriter(folder, layout, shard_size=1500, in_place=kind == "in place")
        assert len(writer.shards) == 3 and writer.in_place == (kind == "in place" and fallocate == "works")
        for name, tensor in tensors.items():
            place = writer.destination(name)
            if writer.in_place and name == "a.weight":  # computed where it goes: nothing to copy
                writer(name, place.copy_(tensor))
            else:
                assert (place is not None) == (writer.in_place and name not in ("empty",))
                writer(name, tensor.clone())
        writer.close()
        written[kind] = {file: (folder / file).read_bytes() for file in writer.files}
        loaded = {}
        for file in writer.files:
            loaded.update(load_file(str(folder / file)))
        assert loaded.keys() == tensors.keys()
        assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())
    assert written["plain"] == written["in place"]
    if fallocate == "works":
        assert writer.destination("empty") is None and writer.destination("nothing") is None


def test_in_place_writer_fsyncs_when_asked(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    layout = [("x", (4, 4), torch.float32)]
    for sync in (False, True):
        writer = ShardedSafetensorsWriter(tmp_path, layout, sync=sync, in_place=True)
        writer("x", torch.ones(4, 4))
        writer.close()
        assert len(synced) == int(sync)
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["x"], torch.ones(4, 4))


def test_existing_output_needs_force(tmp_path, family):
    paths = write_safetensors(tmp_path / "in", family)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        r2m_fast.merge_files(paths[0], paths[1:], out, CONFIG)
    assert (out / "keep.txt").read_text() == "mine"
    r2m_fast.merge_files(paths[0], paths[1:], out, CONFIG, force=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]


def test_output_may_not_replace_an_input(tmp_path, family):
    folders = [write_hf_sharded(tmp_path / f"m{i}", sd, shards=1) for i, sd in enumerate(family)]
    with pytest.raises(MergeInputError, match="would replace input"):
        r2m_fast.merge_files(folders[0], folders[1:], folders[1], CONFIG, force=True)
    with pytest.raises(MergeInputError, match="would replace input"):
        r2m_fast.merge_files(folders[0], folders[1:], tmp_path, CONFIG, force=True)
    assert load_state_dict(folders[1]).keys() == family[1].keys()


# --- errors: each names the file and the tensor ----------------------------------------------------


def _expect(tmp_path, family, models, pattern, prefix=None):
    paths = write_safetensors(tmp_path / "in", models)
    with pytest.raises(MergeInputError, match=pattern):
        r2m_fast.merge_files(paths[0], paths[1:], tmp_path / "out", CONFIG, prefix=prefix)
    assert not (tmp_path / "out").exists()
    return paths


def test_missing_key(tmp_path, family):
    bad = dict(family[2])
    del bad["blocks.0.mlp.fc2.weight"]
    _expect(tmp_path, family, [family[0], family[1], bad], r"m2\.safetensors: keys differ.*missing 'blocks.0.mlp.fc2.weight'")


def test_extra_key(tmp_path, family):
    bad = dict(family[1], extra=torch.zeros(3))
    _expect(tmp_path, family, [family[0], bad, family[2]], r"m1\.safetensors: keys differ.*unexpected 'extra'")


def test_shape_mismatch(tmp_path, family):
    bad = dict(family[2], **{"blocks.0.attn.proj.weight": torch.zeros(24, 25)})
    _expect(tmp_path, family, [family[0], family[1], bad], r"m2\.safetensors: tensor 'blocks.0.attn.proj.weight' has shape \(24, 25\)")


def test_dtype_mismatch(tmp_path, family):
    bad = dict(family[1], **{"pos_embed": family[1]["pos_embed"].half()})
    _expect(tmp_path, family, [family[0], bad, family[2]], r"m1\.safetensors: tensor 'pos_embed' has dtype torch.float16")


@pytest.mark.parametrize("name", ["blocks.0.attn.qkv.weight", "head.weight", "blocks.0.norm1.weight"])
def test_nan_inf(tmp_path, family, name):
    bad = {k: v.clone() for k, v in family[3].items()}
    bad[name].view(-1)[5] = float("inf")
    _expect(tmp_path, family, family[:3] + [bad], rf"m3\.safetensors: tensor '{name}' has 1 NaN/Inf")


def test_truncated_file(tmp_path, family):
    paths = write_safetensors(tmp_path / "in", family)
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[:-100])
    with pytest.raises(MergeInputError, match=r"m2\.safetensors: truncated: tensor '[^']+' needs"):
        r2m_fast.merge_files(paths[0], paths[1:], tmp_path / "out", CONFIG)
    paths[2].write_bytes(data[:5])
    with pytest.raises(MergeInputError, match=r"m2\.safetensors: truncated or not a safetensors file"):
        r2m_fast.merge_files(paths[0], paths[1:], tmp_path / "out", CONFIG)
    assert not (tmp_path / "out").exists()


def test_corrupt_header(tmp_path, family):
    paths = write_safetensors(tmp_path / "in", family)
    data = bytearray(paths[1].read_bytes())
    data[8:12] = b"@@@@"
    paths[1].write_bytes(bytes(data))
    with pytest.raises(MergeInputError, match=r"m1\.safetensors: corrupt safetensors header"):
        open_checkpoint(paths[1])


def test_shard_missing_from_index(tmp_path, family):
    folder = write_hf_sharded(tmp_path / "hf", family[1])
    (folder / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(MergeInputError, match=r"index.json: tensor '[^']+' is in shard model-00002-of-00003"):
        open_checkpoint(folder)


def test_unreadable_and_unknown(tmp_path, family):
    with pytest.raises(MergeInputError, match=r"nope\.safetensors: no such file"):
        open_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MergeInputError, match=r"notes\.txt: unknown checkpoint format '.txt'"):
        open_checkpoint(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MergeInputError, match=r"empty: folder holds neither"):
        open_checkpoint(tmp_path / "empty")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(MergeInputError, match=r"junk\.pt: not a readable PyTorch checkpoint"):
        open_checkpoint(tmp_path / "junk.pt")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "nosd.pt")
    with pytest.raises(MergeInputError, match=r"nosd\.pt: no state dict found"):
        open_checkpoint(tmp_path / "nosd.pt")
    with pytest.raises(MergeInputError, match=r"prefix 'backbone\.'"):
        open_checkpoint(write_safetensors(tmp_path / "p", family[:1])[0], prefix="backbone.")


@pytest.mark.parametrize("denied_by", ["access", "open"])
def test_permission_denied(tmp_path, family, monkeypatch, denied_by):
    """An unreadable input is one line naming it, whether the mode check says so or only the open
    fails (ACLs, SELinux, NFS). Simulated, so the test also runs (and can fail) as root, which reads
    any file whatever its mode."""
    import builtins

    import r2m_fast.io as io_module

    paths = write_safetensors(tmp_path / "in", family)
    denied = paths[1]
    if denied_by == "access":
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == denied else real_access(p, mode, **kw))
    else:
        def fake_open(file, *args, **kwargs):
            if Path(file) == denied:
                raise PermissionError(13, "Permission denied", str(file))
            return builtins.open(file, *args, **kwargs)

        monkeypatch.setattr(io_module, "open", fake_open, raising=False)
    with pytest.raises(MergeInputError, match=r"m1\.safetensors: (permission denied|cannot read: Permission denied)"):
        open_checkpoint(denied)
    with pytest.raises(MergeInputError, match=r"m1\.safetensors: (permission denied|cannot read: Permission denied)"):
        r2m_fast.merge_files(paths[0], paths[1:], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sigterm_during_merge_files_leaves_nothing(tmp_path, family):
    """From Python too (no handler of the caller's): a default SIGTERM still cleans the temp folder."""
    import signal
    import subprocess
    import sys
    import time

    from r2m_fast.output import SINK_DELAY_ENV

    paths = write_safetensors(tmp_path, family)
    code = (
        "import sys, r2m_fast; "
        "r2m_fast.merge_files(sys.argv[1], sys.argv[2:-1], sys.argv[-1], shard_size=1000)"
    )
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    env[SINK_DELAY_ENV] = "0.5"
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, paths), str(tmp_path / "out")], env=env,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        temps = list(tmp_path.glob(".out.tmp-*"))
        if temps and any(has_written_tensors(shard) for shard in temps[0].glob("*.safetensors")):
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in paths]
