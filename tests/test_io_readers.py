"""Opening checkpoints: folders, shards, single files, the Hub cache; headers only."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import surgery
from surgery.errors import CheckpointError, PickleRefusedError
from _support import (assert_close_ulp, copy_checkpoint, make_hub_cache, raw_safetensors, read_folder,
                      soup_reference, write_st)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def listing(folder: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """name -> (dtype, shape, file name), straight from safetensors."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                s = sf.get_slice(k)
                out[k] = (s.get_dtype(), tuple(s.get_shape()), f.name)
    return out


def assert_matches_listing(ckpt, folder, file_names=True):
    expected = listing(folder)
    assert set(ckpt.tensors) == set(expected)
    for name, info in ckpt.tensors.items():
        dtype, shape, fname = expected[name]
        assert (info.dtype, info.shape) == (dtype, shape), name
        if file_names:
            assert os.path.basename(info.file) == fname, name


def test_folder_with_model_safetensors(qwen2):
    ckpt = surgery.open_checkpoint(qwen2.base)
    assert_matches_listing(ckpt, qwen2.base)
    assert ckpt.config["model_type"] == "qwen2"
    # the head the config ties is known and reads as the embedding
    assert "lm_head.weight" in ckpt and "lm_head.weight" not in ckpt.tensors
    assert ckpt.tied["lm_head.weight"] == "model.embed_tokens.weight"
    files = read_folder(qwen2.base)
    assert torch.equal(ckpt.read("lm_head.weight"), files["model.embed_tokens.weight"])
    for name, t in files.items():
        assert torch.equal(ckpt.read(name), t), name


def test_sharded_folder_with_index(llama):
    ckpt = surgery.open_checkpoint(llama.base)
    index = json.loads((llama.base / "model.safetensors.index.json").read_text())
    assert set(ckpt.tensors) == set(index["weight_map"])
    for name, info in ckpt.tensors.items():
        assert os.path.basename(info.file) == index["weight_map"][name]
    assert sorted(os.path.basename(f) for f in ckpt.files) == sorted(set(index["weight_map"].values()))
    assert_matches_listing(ckpt, llama.base)
    assert ckpt.tied == {}  # an untied model has nothing to follow
    files = read_folder(llama.base)
    for name, t in files.items():
        assert torch.equal(ckpt.read(name), t), name
    assert ckpt.num_parameters == sum(t.numel() for t in files.values())
    assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in files.values())


def test_index_file_path(llama):
    ckpt = surgery.open_checkpoint(llama.base / "model.safetensors.index.json")
    assert_matches_listing(ckpt, llama.base)


def test_single_safetensors_file(gpt2, tmp_path):
    ckpt = surgery.open_checkpoint(gpt2.base / "model.safetensors")
    assert_matches_listing(ckpt, gpt2.base)
    assert ckpt.tied["lm_head.weight"] == "transformer.wte.weight"  # config.json next to it is read
    # a lone file with no config next to it
    lone = write_st(tmp_path / "lone" / "weights.safetensors", {"a": torch.arange(6.0).reshape(2, 3)})
    c = surgery.open_checkpoint(str(lone))
    assert list(c.tensors) == ["a"] and c.tensors["a"].shape == (2, 3) and c.config is None
    assert torch.equal(c.read("a"), torch.arange(6.0).reshape(2, 3))
    # and it soups
    lone2 = write_st(tmp_path / "lone2.safetensors", {"a": torch.ones(2, 3)})
    out = surgery.soup([str(lone), str(lone2)], tmp_path / "o")
    assert torch.equal(read_folder(out)["a"], (torch.arange(6.0).reshape(2, 3) * 0.5 + torch.ones(2, 3) * 0.5))


def test_several_safetensors_without_index(tmp_path):
    write_st(tmp_path / "m" / "a.safetensors", {"x": torch.zeros(2)})
    write_st(tmp_path / "m" / "b.safetensors", {"y": torch.ones(3)})
    c = surgery.open_checkpoint(tmp_path / "m")
    assert set(c.tensors) == {"x", "y"}
    write_st(tmp_path / "m" / "c.safetensors", {"y": torch.ones(3)})
    with pytest.raises(CheckpointError, match="two files") as e:
        surgery.open_checkpoint(tmp_path / "m")
    assert "'y'" in str(e.value) and "c.safetensors" in str(e.value)


# -- Hub ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("revision", ["", "@" + COMMIT, "@main"])
def test_hub_id_single_file(qwen2, hub_cache, revision):
    snap = make_hub_cache(hub_cache, "tiny-org/qwen2-tied", qwen2.base, COMMIT)
    assert (snap / "model.safetensors").is_symlink()
    ckpt = surgery.open_checkpoint("tiny-org/qwen2-tied" + revision)
    assert Path(ckpt.root) == snap
    assert_matches_listing(ckpt, qwen2.base, file_names=False)  # (file names: see test_hub_shard_names)
    for name, t in read_folder(qwen2.base).items():
        assert torch.equal(ckpt.read(name), t)
    assert ckpt.tied["lm_head.weight"] == "model.embed_tokens.weight"


@pytest.mark.parametrize("revision", ["", "@" + COMMIT])
def test_hub_id_sharded(llama, hub_cache, revision):
    """A sharded repo in the cache: the index and every shard are symlinks into blobs/."""
    snap = make_hub_cache(hub_cache, "tiny-org/llama-sharded", llama.base, COMMIT)
    assert (snap / "model.safetensors.index.json").is_symlink()
    ckpt = surgery.open_checkpoint("tiny-org/llama-sharded" + revision)
    assert set(ckpt.tensors) == set(read_folder(llama.base))
    for name, t in read_folder(llama.base).items():
        assert torch.equal(ckpt.read(name), t)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_hub_shard_names(request, family, hub_cache):
    """Reports name a Hub checkpoint's files as the repo does, not by their blob hashes."""
    src = getattr(request.getfixturevalue(family), "base")
    make_hub_cache(hub_cache, "tiny-org/names", src, COMMIT)
    report = surgery.inspect(["tiny-org/names"])
    expected = {}
    for name, (_, _, fname) in listing(src).items():
        expected[fname] = expected.get(fname, 0) + 1
    assert {s.file: s.tensors for s in report.checkpoints[0].shards} == expected


def test_soup_from_hub_ids_records_them(qwen2, hub_cache, tmp_path):
    make_hub_cache(hub_cache, "tiny-org/a", qwen2.base, COMMIT)
    make_hub_cache(hub_cache, "tiny-org/b", qwen2.v1, "f" * 40)
    out = surgery.soup(["tiny-org/a", "tiny-org/b@" + "f" * 40], tmp_path / "hub-soup")
    a, b = read_folder(qwen2.base), read_folder(qwen2.v1)
    got = read_folder(out)
    for k in a:
        assert_close_ulp(got[k], soup_reference([a[k], b[k]], [0.5, 0.5], torch.float32), 1, k)
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "- tiny-org/a" in front and "- tiny-org/b" in front and "base_model_relation: merge" in front
    record = json.loads((out / "surgery_recipe.json").read_text())
    assert [e.get("revision") for e in record["inputs"]] == [COMMIT, "f" * 40]
    assert json.loads((out / "config.json").read_text())["surgery_fixture"] == "qwen2-base"


def test_hub_id_not_in_cache(hub_cache):
    with pytest.raises(CheckpointError) as e:
        surgery.open_checkpoint("tiny-org/absent")
    assert "tiny-org/absent" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value)


def test_hub_unknown_revision(qwen2, hub_cache):
    make_hub_cache(hub_cache, "tiny-org/q", qwen2.base, COMMIT)
    with pytest.raises(CheckpointError, match="tiny-org/q@"):
        surgery.open_checkpoint("tiny-org/q@" + "e" * 40)


def test_hub_cli_with_real_environment(qwen2, tmp_path):
    """The environment alone (as a user sets it) points the CLI at the cache."""
    home = tmp_path / "hf"
    make_hub_cache(home / "hub", "tiny-org/env", qwen2.base, COMMIT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", COLUMNS="200")
    proc = subprocess.run([sys.executable, "-c", "from surgery_cli.app import main; main()", "inspect",
                           "tiny-org/env", "--summary"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    n = len(read_folder(qwen2.base))
    assert f"tiny-org/env: {n} tensors" in proc.stdout


# -- refusing what is unsafe --------------------------------------------------------------------


@pytest.mark.parametrize("where", ["parent", "absolute", "nested_parent"])
def test_index_pointing_outside_is_refused(llama, tmp_path, where):
    ckpt = copy_checkpoint(llama.base, tmp_path / "ckpt")
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    victim = "model.norm.weight"
    real_shard = ckpt / index["weight_map"][victim]
    outside = tmp_path / "x.safetensors"
    outside.write_bytes(real_shard.read_bytes())  # a valid file: only its location is wrong
    index["weight_map"][victim] = {"parent": "../x.safetensors", "absolute": str(outside),
                                   "nested_parent": "sub/../../x.safetensors"}[where]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as e:
        surgery.open_checkpoint(ckpt)
    msg = str(e.value)
    assert "outside" in msg and "model.safetensors.index.json" in msg and repr(victim) in msg


def test_index_missing_shard(llama, tmp_path):
    ckpt = copy_checkpoint(llama.base, tmp_path / "ckpt")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["model.norm.weight"]
    (ckpt / shard).unlink()
    with pytest.raises(CheckpointError) as e:
        surgery.open_checkpoint(ckpt)
    assert shard in str(e.value) and "missing shard" in str(e.value)


# -- headers only --------------------------------------------------------------------------------


def test_listing_reads_headers_only_garbage_data(tmp_path):
    entries = {"emb": ("BF16", [300, 7]), "ids": ("I64", [5]), "mask": ("BOOL", [3, 3]), "w": ("F32", [11, 2])}
    size = 300 * 7 * 2 + 5 * 8 + 9 + 11 * 2 * 4
    path = raw_safetensors(tmp_path / "g" / "model.safetensors", entries, data=os.urandom(size))
    ckpt = surgery.open_checkpoint(path.parent)
    assert {n: (t.dtype, list(t.shape)) for n, t in ckpt.tensors.items()} == entries
    report = surgery.inspect([path.parent])
    assert report.checkpoints[0].tensors == 4
    assert report.checkpoints[0].bytes == size
    assert {n: (d, list(s)) for n, d, s in report.tensors} == entries


def test_listing_reads_headers_only_terabyte(tmp_path):
    """A 1 TiB tensor in a sparse file: listing and inspecting it never touch its bytes."""
    n = 2 ** 38  # float32 elements: 1 TiB
    path = raw_safetensors(tmp_path / "big" / "model.safetensors",
                           {"huge": ("F32", [n]), "small": ("I8", [4])}, data=None)
    ckpt = surgery.open_checkpoint(path.parent)
    assert ckpt.tensors["huge"].shape == (n,) and ckpt.tensors["huge"].dtype == "F32"
    assert ckpt.total_bytes == 4 * n + 4
    report = surgery.inspect([str(path.parent)])
    summary = report.checkpoints[0]
    assert summary.parameters == n + 4 and summary.dtypes == {"F32": n, "I8": 4}
    assert [(s.file, s.tensors, s.bytes) for s in summary.shards] == [("model.safetensors", 2, 4 * n + 4)]
    # the one small tensor can still be read on its own
    assert ckpt.read("small").tolist() == [0, 0, 0, 0]


# -- damaged files -------------------------------------------------------------------------------


def _write_header(path: Path, header_bytes: bytes, declared: int | None = None, tail: bytes = b""):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write((len(header_bytes) if declared is None else declared).to_bytes(8, "little"))
        f.write(header_bytes)
        f.write(tail)
    return path


@pytest.mark.parametrize("case", ["short", "huge_length", "not_json", "not_object", "bad_entry",
                                  "bad_dtype", "wrong_size", "overlap", "past_end"])
def test_corrupt_headers(tmp_path, case):
    p = tmp_path / "c" / "model.safetensors"
    ok = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    if case == "short":
        p.parent.mkdir()
        p.write_bytes(b"\x01\x02")
    elif case == "huge_length":
        _write_header(p, b"{}", declared=10 ** 12)
    elif case == "not_json":
        _write_header(p, b"{not json at all", tail=b"\0" * 8)
    elif case == "not_object":
        _write_header(p, b"[1, 2, 3]")
    elif case == "bad_entry":
        _write_header(p, json.dumps({"a": {"dtype": "F32"}}).encode())
    elif case == "bad_dtype":
        _write_header(p, json.dumps({"a": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}).encode(),
                      tail=b"\0" * 8)
    elif case == "wrong_size":
        _write_header(p, json.dumps({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}).encode(),
                      tail=b"\0" * 12)
    elif case == "overlap":
        h = dict(ok, b={"dtype": "F32", "shape": [2], "data_offsets": [4, 12]})
        _write_header(p, json.dumps(h).encode(), tail=b"\0" * 12)
    elif case == "past_end":
        _write_header(p, json.dumps(ok).encode(), tail=b"\0" * 7)
    with pytest.raises(CheckpointError) as e:
        surgery.open_checkpoint(p.parent)
    assert str(p) in str(e.value)
    if case in ("bad_dtype", "wrong_size", "past_end"):
        assert "'a'" in str(e.value)
    if case == "overlap":
        assert "'a'" in str(e.value) and "'b'" in str(e.value)


def test_truncated_shard(llama, tmp_path):
    ckpt = copy_checkpoint(llama.base, tmp_path / "ckpt")
    shard = sorted(ckpt.glob("model-*.safetensors"))[1]
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    with safe_open(str(llama.base / shard.name), "pt") as sf:
        names = list(sf.keys())
    with pytest.raises(CheckpointError) as e:
        surgery.open_checkpoint(ckpt)
    msg = str(e.value)
    assert "truncated" in msg and str(shard.resolve()) in msg and any(repr(n) in msg for n in names)


def test_file_truncated_after_opening(gpt2, tmp_path):
    """A shard that shrinks between listing and reading fails the read, naming file and tensor."""
    ckpt_dir = copy_checkpoint(gpt2.base, tmp_path / "ckpt")
    ckpt = surgery.open_checkpoint(ckpt_dir)
    last = max(ckpt.tensors.values(), key=lambda t: t.end)
    with open(last.file, "r+b") as f:
        f.truncate(last.begin + 4)
    with pytest.raises(CheckpointError) as e:
        ckpt.read(last.name)
    assert "truncated" in str(e.value) and repr(last.name) in str(e.value) and last.file in str(e.value)


def test_missing_path():
    with pytest.raises(CheckpointError, match="no such file"):
        surgery.open_checkpoint("/definitely/not/here")
    with pytest.raises(CheckpointError, match="no such file"):
        surgery.open_checkpoint("./relative-but-absent")


def test_folder_without_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        surgery.open_checkpoint(tmp_path / "empty")


def test_several_indexes_is_ambiguous(llama, tmp_path):
    ckpt = copy_checkpoint(llama.base, tmp_path / "ckpt")
    (ckpt / "model.safetensors.index.json").rename(ckpt / "a.safetensors.index.json")
    (ckpt / "b.safetensors.index.json").write_bytes((ckpt / "a.safetensors.index.json").read_bytes())
    with pytest.raises(CheckpointError, match="several safetensors indexes"):
        surgery.open_checkpoint(ckpt)
    assert set(surgery.open_checkpoint(ckpt / "b.safetensors.index.json").tensors) == set(read_folder(llama.base))


# -- pickle --------------------------------------------------------------------------------------


@pytest.fixture
def pickled(gpt2, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    state = read_folder(gpt2.v1)
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_bytes((gpt2.v1 / "config.json").read_bytes())
    return folder


def test_pickle_refused_without_allow(pickled):
    with pytest.raises(PickleRefusedError) as e:
        surgery.open_checkpoint(pickled)
    assert "pytorch_model.bin" in str(e.value) and "--allow-pickle" in str(e.value)
    with pytest.raises(PickleRefusedError):
        surgery.open_checkpoint(pickled / "pytorch_model.bin")


def test_pickle_read_with_allow(pickled, gpt2):
    ckpt = surgery.open_checkpoint(pickled, allow_pickle=True)
    expected = read_folder(gpt2.v1)
    assert set(ckpt.tensors) == set(expected)
    for name, t in expected.items():
        info = ckpt.tensors[name]
        assert info.shape == tuple(t.shape) and info.nbytes == t.numel() * t.element_size()
        assert torch.equal(ckpt.read(name), t)
