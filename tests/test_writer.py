"""The streaming shard writer: planned layout, valid safetensors, alignment, the index."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from surgery.errors import PlanError
from surgery.io.writer import ShardWriter, TensorSpec, parse_size, plan_shards, write_index
from _support import ELEMENT_SIZE, data_start, header_of

CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
         torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
         torch.bool: "BOOL"}


@pytest.mark.parametrize("text,value", [("5GB", 5 * 10 ** 9), ("200MB", 200 * 10 ** 6), ("100KB", 100_000),
                                        ("2GiB", 2 * 2 ** 30), ("1.5KB", 1500), ("64kib", 65536), ("123", 123),
                                        (4096, 4096), (" 7 MB ", 7 * 10 ** 6)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("bad", ["", "5 parsecs", "GB", "-3MB", "1e3"])
def test_parse_size_refuses(bad):
    with pytest.raises(PlanError, match="cannot parse size"):
        parse_size(bad)


def _tensors():
    """Mixed dtypes with odd sizes, a scalar and an empty tensor, in a deliberately mixed order."""
    g = torch.Generator().manual_seed(0)
    return {
        "a.bool": torch.rand(7, generator=g) > 0.5,
        "b.f32": torch.randn(3, 5, generator=g),
        "c.i8": torch.randint(-100, 100, (3,), generator=g, dtype=torch.int8),
        "d.bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "e.f64": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "f.u8": torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8),
        "g.i64": torch.randint(-10 ** 12, 10 ** 12, (3,), generator=g, dtype=torch.int64),
        "h.f16": torch.randn(1, 3, generator=g).to(torch.float16),
        "i.scalar": torch.tensor(3.5),
        "j.empty": torch.zeros(0, 4),
        "k.i32": torch.randint(-5, 5, (1,), generator=g, dtype=torch.int32),
        "l.i16": torch.randint(-5, 5, (3,), generator=g, dtype=torch.int16),
    }


def _specs(tensors):
    return [TensorSpec(k, CODES[v.dtype], tuple(v.shape)) for k, v in tensors.items()]


def _write(folder, shards, tensors):
    for shard in shards:
        w = ShardWriter(folder, shard)
        for spec in shard.tensors:
            w.write(spec.name, tensors[spec.name])
        assert w.done
        w.close()


def test_single_shard_roundtrip_and_alignment(tmp_path):
    tensors = _tensors()
    shards = plan_shards(_specs(tensors))
    assert [s.filename for s in shards] == ["model.safetensors"]
    _write(tmp_path, shards, tensors)
    path = tmp_path / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(tensors)
        for k, v in tensors.items():
            got = f.get_tensor(k)
            assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    assert set(load_file(str(path))) == set(tensors)
    # data starts 8-byte aligned and each tensor starts at a multiple of its element size
    start = data_start(path)
    assert start % 8 == 0
    header = header_of(path)
    for k, e in header.items():
        if k != "__metadata__":
            assert (start + e["data_offsets"][0]) % ELEMENT_SIZE[e["dtype"]] == 0, k
    ends = sorted(e["data_offsets"] for k, e in header.items() if k != "__metadata__")
    assert ends[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ends, ends[1:]))  # packed, no gaps
    assert path.stat().st_size == start + ends[-1][1]


def test_plan_shards_fills_in_order(tmp_path):
    specs = [TensorSpec(f"t{i}", "F32", (n,)) for i, n in enumerate([10, 10, 10, 30, 5, 5, 40, 1])]
    shards = plan_shards(specs, 100)  # bytes: 40 40 40 120 20 20 160 4
    groups = [[t.name for t in s.tensors] for s in shards]
    assert groups == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"], ["t6"], ["t7"]]
    assert [s.filename for s in shards] == [f"model-{i:05d}-of-00006.safetensors" for i in range(1, 7)]
    for s in shards:
        assert s.nbytes <= 100 or len(s.tensors) == 1
    tensors = {t.name: torch.arange(t.shape[0], dtype=torch.float32) + i for i, t in enumerate(specs)}
    _write(tmp_path, shards, tensors)
    write_index(tmp_path, shards)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {t.name: s.filename for s in shards for t in s.tensors}
    assert index["metadata"]["total_size"] == sum(4 * t.shape[0] for t in specs)
    for s in shards:
        with safe_open(str(tmp_path / s.filename), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            for t in s.tensors:
                assert torch.equal(f.get_tensor(t.name), tensors[t.name])


def test_mixed_dtypes_across_shards(tmp_path):
    tensors = _tensors()
    shards = plan_shards(_specs(tensors), 40)
    assert len(shards) >= 3
    _write(tmp_path, shards, tensors)
    write_index(tmp_path, shards)
    seen = {}
    for s in shards:
        path = tmp_path / s.filename
        start = data_start(path)
        for k, e in header_of(path).items():
            if k != "__metadata__":
                assert (start + e["data_offsets"][0]) % ELEMENT_SIZE[e["dtype"]] == 0, k
        seen.update(load_file(str(path)))
    assert set(seen) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(seen[k], v)


def test_single_shard_has_no_index(tmp_path):
    shards = plan_shards([TensorSpec("x", "F32", (4,))])
    write_index(tmp_path, shards)
    assert not (tmp_path / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("case", ["order", "dtype", "shape"])
def test_writer_refuses_what_was_not_planned(tmp_path, case):
    shard = plan_shards([TensorSpec("a", "F32", (2, 2)), TensorSpec("b", "F32", (3,))])[0]
    w = ShardWriter(tmp_path, shard)
    try:
        with pytest.raises(PlanError) as e:
            if case == "order":
                w.write("b", torch.zeros(3))
            elif case == "dtype":
                w.write("a", torch.zeros(2, 2, dtype=torch.float64))
            else:
                w.write("a", torch.zeros(4))
        assert "'a'" in str(e.value) or "'b'" in str(e.value)
    finally:
        w.close()


def test_writer_writes_non_contiguous_tensors(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # a transposed view
    shard = plan_shards([TensorSpec("t", "F32", (4, 3))])[0]
    w = ShardWriter(tmp_path, shard)
    w.write("t", t)
    assert w.done
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["t"], t)


def _direct_supported(folder) -> bool:
    import os

    if not getattr(os, "O_DIRECT", 0):
        return False
    try:
        os.close(os.open(folder / ".probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644))
    except OSError:
        return False
    finally:
        (folder / ".probe").unlink(missing_ok=True)
    return True


def _big_tensors():
    """Odd sizes around a small staging buffer: tensors inside one flush, across several, and an empty one."""
    g = torch.Generator().manual_seed(3)
    return {"a": torch.randn(1000, generator=g), "b": torch.randn(3 * 4096 + 7, generator=g).to(torch.bfloat16),
            "c": torch.zeros(0), "d": torch.randint(0, 9, (12345,), generator=g, dtype=torch.int8),
            "e": torch.randn(5, 4099, generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("stage", [8192, 1 << 20])
def test_direct_and_page_cache_writes_give_the_same_file(tmp_path, monkeypatch, stage):
    """Direct writes go through an aligned staging buffer whose last block is padded, then the file
    is cut to its length: the bytes equal a plain write's, and safetensors reads them back."""
    import surgery.io.sink as sink
    from surgery.io.writer import SHARD_SHA256
    import hashlib

    monkeypatch.setattr(sink, "STAGE_BYTES", stage)
    tensors = _big_tensors()
    shards = plan_shards(_specs(tensors))
    files = {}
    for mode in ("1", "0"):
        monkeypatch.setenv(sink.DIRECT_ENV, mode)
        folder = tmp_path / f"direct{mode}"
        folder.mkdir()
        w = ShardWriter(folder, shards[0])
        assert w._sink.direct == (mode == "1" and _direct_supported(folder))
        for spec in shards[0].tensors:
            w.write(spec.name, tensors[spec.name])
        files[mode] = (folder / "model.safetensors").read_bytes()
        assert SHARD_SHA256[str(folder / "model.safetensors")] == hashlib.sha256(files[mode]).hexdigest()
    assert files["1"] == files["0"]
    got = load_file(str(tmp_path / "direct1" / "model.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("trouble", ["refused", "short"])
def test_a_direct_write_that_fails_midway_carries_on_through_the_page_cache(tmp_path, monkeypatch, trouble):
    """A filesystem that refuses a direct write after accepting the open (EINVAL), or a direct
    write that stops off the alignment: the bytes already written stay, the rest of the file goes
    through the page cache from where they end, and the file is whole."""
    import errno
    import fcntl
    import os

    import surgery.io.sink as sink

    if not _direct_supported(tmp_path):
        pytest.skip("this filesystem takes no direct writes")
    monkeypatch.setattr(sink, "STAGE_BYTES", 8192)
    real_write, calls = os.write, []

    def troubled(fd, data):
        calls.append(len(data))
        if len(calls) == 2 and trouble == "refused":
            raise OSError(errno.EINVAL, "Invalid argument")
        if len(calls) == 2:  # stop 100 bytes past a block, as a write cut short would
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            return real_write(fd, data[:4196])
        return real_write(fd, data)

    monkeypatch.setattr(sink.os, "write", troubled)
    tensors = _big_tensors()
    shard = plan_shards(_specs(tensors))[0]
    w = ShardWriter(tmp_path, shard)
    for spec in shard.tensors:
        w.write(spec.name, tensors[spec.name])
    assert w._sink._fallback is not None and len(calls) > 3
    got = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    assert (tmp_path / "model.safetensors").stat().st_size == len(shard.header_bytes()) + shard.nbytes
