"""TaskVector algebra in Python: ``between``, ``+``, ``-``, unary ``-``, ``* s``, ``/ s``, ``sum``,
``apply_to(...).save(...)``, ``save``/``load``, checked against the same algebra done in memory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tv_support import (assert_float32_bound, assert_no_output, assert_ulp, content_hash, file_dtypes,
                        read_tensors, ulp_distance, write_checkpoint)


@pytest.fixture(scope="module")
def TaskVector():
    from surgery import TaskVector

    return TaskVector


def d64(ft: Path, base: Path) -> dict[str, torch.Tensor]:
    f, b = read_tensors(ft), read_tensors(base)
    return {n: f[n].double() - b[n].double() for n in f}


def test_between_save_is_the_difference(zoo, TaskVector, tmp_path):
    base, ft = zoo["llama/base"], zoo["llama/ft1"]
    tv = TaskVector.between(ft, base)
    out = tv.save(tmp_path / "delta")
    got = read_tensors(out)
    want = d64(ft, base)
    assert set(got) == set(want)
    # fp32 inputs: stored one precision up, so the delta is the exact float64 difference
    for n in want:
        assert got[n].dtype == torch.float64 and torch.equal(got[n], want[n]), n
    manifest = json.loads((Path(out) / "surgery_delta.json").read_text())
    assert manifest["ft"] == {"source": str(ft), "content_sha256": content_hash(ft)}
    assert manifest["base"] == {"source": str(base), "content_sha256": content_hash(base)}


def test_algebra_applied_equals_in_memory(zoo, TaskVector, tmp_path):
    """A compound expression over two task vectors, applied with a scale to another base, is the same
    expression evaluated in memory in float64: within one ulp of the (bf16) output, plus what float32
    arithmetic may lose at the size of the terms."""
    base, ft1, ft2, target = (zoo[f"llama-bf16/{v}"] for v in ("base", "ft1", "ft2", "target"))
    a, b = TaskVector.between(ft1, base), TaskVector.between(ft2, base)
    expr = (a + (-b) * 0.5) + sum([a, b]) * 0.25 - b / 4 + 0.5 * a
    out = expr.apply_to(target, 0.8).save(tmp_path / "out")
    d1, d2, t = d64(ft1, base), d64(ft2, base), read_tensors(target)
    got = read_tensors(out)
    assert set(got) == set(t)
    for n, v in got.items():
        e = (d1[n] - 0.5 * d2[n]) + 0.25 * (d1[n] + d2[n]) - d2[n] / 4 + 0.5 * d1[n]
        size = t[n].double().abs() + 0.8 * (2 * d1[n].abs() + 1.5 * d2[n].abs())
        assert_float32_bound(v, t[n].double() + 0.8 * e, size, n)


@pytest.mark.parametrize("dtype", [None, "fp32"])
def test_algebra_saved_as_delta(zoo, TaskVector, tmp_path, dtype):
    """Sums and scalings saved as a delta (float32): the float64 computation, up to float32 rounding."""
    base, ft1, ft2, ft3 = (zoo[f"llama-bf16/{v}"] for v in ("base", "ft1", "ft2", "ft3"))
    tvs = [TaskVector.between(f, base) for f in (ft1, ft2, ft3)]
    total = sum(tvs)
    explicit = tvs[0] + tvs[1] + tvs[2]
    out_sum = total.save(tmp_path / "sum", dtype=dtype)
    out_explicit = explicit.save(tmp_path / "explicit", dtype=dtype)
    out_neg = (-tvs[0]).save(tmp_path / "neg", dtype=dtype)
    out_scaled = (tvs[1] * 0.25 - tvs[2] / 2).save(tmp_path / "scaled", dtype=dtype)
    ds = [d64(f, base) for f in (ft1, ft2, ft3)]
    s, e, ng, sc = (read_tensors(p) for p in (out_sum, out_explicit, out_neg, out_scaled))
    for n in ds[0]:
        assert s[n].dtype == torch.float32
        assert torch.equal(s[n], e[n]), n
        assert_float32_bound(s[n], ds[0][n] + ds[1][n] + ds[2][n], ds[0][n].abs() + ds[1][n].abs() + ds[2][n].abs(),
                             f"sum {n}")
        assert torch.equal(ng[n], (-ds[0][n]).float()), f"neg {n}"
        assert_float32_bound(sc[n], 0.25 * ds[1][n] - ds[2][n] / 2, 0.25 * ds[1][n].abs() + ds[2][n].abs() / 2,
                             f"scaled {n}")


def test_sum_of_nothing_but_one(zoo, TaskVector, tmp_path):
    base, ft1 = zoo["llama-bf16/base"], zoo["llama-bf16/ft1"]
    tv = TaskVector.between(ft1, base)
    got = read_tensors(sum([tv]).save(tmp_path / "one"))
    for n, d in d64(ft1, base).items():
        assert torch.equal(got[n], d.float()), n


def test_apply_then_revert_returns_the_base(zoo, TaskVector, tmp_path):
    """Scale 1 on bf16: applying the vector gives the fine-tune and applying its negation gives the
    base back, bit for bit. Scale 0.7 through a float32 intermediate: back within one bf16 ulp."""
    base, ft = zoo["llama-bf16/base"], zoo["llama-bf16/ft1"]
    tv = TaskVector.between(ft, base)
    b, f = read_tensors(base), read_tensors(ft)
    applied = tv.apply_to(base).save(tmp_path / "applied")
    reverted = (-tv).apply_to(applied).save(tmp_path / "reverted")
    a, r = read_tensors(applied), read_tensors(reverted)
    for n in b:
        assert torch.equal(a[n], f[n]), n
        assert r[n].dtype == torch.bfloat16 and torch.equal(r[n], b[n]), n

    applied = tv.apply_to(base, 0.7).save(tmp_path / "applied07", dtype="fp32")
    assert set(file_dtypes(applied).values()) == {"F32"}
    reverted = (-tv).apply_to(applied, 0.7).save(tmp_path / "reverted07", dtype="bf16")
    a, r = read_tensors(applied), read_tensors(reverted)
    moved = 0
    for n in b:
        moved += int((a[n] != b[n].float()).sum())
        assert_ulp(r[n], b[n], 1, n)
    assert moved > 0.9 * sum(v.numel() for v in b.values()), "the intermediate must differ from the base"


def test_saved_vector_loads_and_applies_like_the_lazy_one(zoo, TaskVector, tmp_path):
    base, ft, target = zoo["llama-bf16/base"], zoo["llama-bf16/ft1"], zoo["llama-bf16/target"]
    tv = TaskVector.between(ft, base)
    tv.save(tmp_path / "delta")
    loaded = TaskVector.load(tmp_path / "delta")
    assert loaded.sources["ft"]["source"] == str(ft) and loaded.sources["base"]["source"] == str(base)
    direct = read_tensors(tv.apply_to(target, 0.6).save(tmp_path / "direct"))
    via = read_tensors(loaded.apply_to(target, 0.6).save(tmp_path / "via"))
    d, t = d64(ft, base), read_tensors(target)
    for n in t:
        assert torch.equal(direct[n], via[n]), n
        assert_float32_bound(via[n], t[n].double() + 0.6 * d[n], t[n].double().abs() + 0.6 * d[n].abs(), n)


def test_load_refuses_a_plain_checkpoint(zoo, TaskVector):
    from surgery.errors import SurgeryError

    with pytest.raises(SurgeryError, match="surgery_delta.json"):
        TaskVector.load(zoo["llama/base"])


# ---------------------------------------------------------------------------------------------
# Integer and bool tensors: carried, never differenced


def _handmade(tmp_path: Path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, generator=g)
    base = write_checkpoint(tmp_path / "base", {"layer.weight": w, "positions": torch.arange(8, dtype=torch.int64),
                                                "mask": torch.tensor([True, False, True, False])})
    ft = write_checkpoint(tmp_path / "ft", {"layer.weight": w + torch.randn(4, 6, generator=g) * 0.1,
                                            "positions": torch.arange(8, dtype=torch.int64) * 3 + 1,
                                            "mask": torch.tensor([False, False, True, True])})
    target = write_checkpoint(tmp_path / "target", {"layer.weight": torch.randn(4, 6, generator=g),
                                                    "positions": torch.arange(8, dtype=torch.int64) + 100,
                                                    "mask": torch.tensor([True, True, True, False])})
    return base, ft, target


def test_integer_and_bool_tensors_are_carried(TaskVector, tmp_path):
    base, ft, target = _handmade(tmp_path)
    b, f, t = read_tensors(base), read_tensors(ft), read_tensors(target)
    tv = TaskVector.between(ft, base)
    delta = read_tensors(tv.save(tmp_path / "delta"))
    assert delta["positions"].dtype == torch.int64 and torch.equal(delta["positions"], f["positions"])
    assert delta["mask"].dtype == torch.bool and torch.equal(delta["mask"], f["mask"])
    assert torch.equal(delta["layer.weight"], (f["layer.weight"].double() - b["layer.weight"].double()).float())
    # algebra leaves them alone too
    tripled = read_tensors((tv * 3 + (-tv)).save(tmp_path / "tripled"))
    assert torch.equal(tripled["positions"], f["positions"]) and torch.equal(tripled["mask"], f["mask"])
    # applied: the target's own integer and bool tensors stay
    for vector in (tv, TaskVector.load(tmp_path / "delta")):
        out = read_tensors(vector.apply_to(target, 0.5).save(tmp_path / f"out{id(vector)}"))
        assert out["positions"].dtype == torch.int64 and torch.equal(out["positions"], t["positions"])
        assert out["mask"].dtype == torch.bool and torch.equal(out["mask"], t["mask"])
        d = f["layer.weight"].double() - b["layer.weight"].double()
        ref = t["layer.weight"].double() + 0.5 * d
        assert_float32_bound(out["layer.weight"], ref, t["layer.weight"].double().abs() + d.abs(), "layer.weight")


def test_integer_tensors_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from surgery_cli.app import app

    base, ft, target = _handmade(tmp_path)
    r = CliRunner().invoke(app, ["diff", str(ft), str(base), "-o", str(tmp_path / "delta")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["transfer", "--to", str(target), "--diff", str(tmp_path / "delta"),
                                 "-o", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    out, t = read_tensors(tmp_path / "out"), read_tensors(target)
    assert torch.equal(out["positions"], t["positions"]) and torch.equal(out["mask"], t["mask"])
    # float32 weights: the delta is stored one precision up; integer and bool tensors keep their dtype
    assert file_dtypes(tmp_path / "delta") == {"layer.weight": "F64", "positions": "I64", "mask": "BOOL"}


# ---------------------------------------------------------------------------------------------
# Mismatches


def test_algebra_of_mismatched_vectors_lists_every_problem(zoo, TaskVector, tmp_path):
    from surgery.errors import IncompatibleInputsError

    a = TaskVector.between(zoo["llama/ft1"], zoo["llama/base"])
    narrow = TaskVector.between(zoo["llama/target-narrow"], zoo["llama/target-narrow"])
    biased = TaskVector.between(zoo["llama/ft-bias"], zoo["llama/base-bias"])
    with pytest.raises(IncompatibleInputsError) as e:
        a + narrow
    mlp = [f"model.layers.{i}.mlp.{p}_proj.weight" for i in range(2) for p in ("gate", "up", "down")]
    assert len(e.value.problems) == 6 and all(any(repr(n) in p for p in e.value.problems) for n in mlp)
    with pytest.raises(IncompatibleInputsError) as e:
        a - biased
    biases = [f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in ("q", "k", "v", "o")]
    assert len(e.value.problems) == 8 and all(any(repr(n) in p for p in e.value.problems) for n in biases)
    with pytest.raises(IncompatibleInputsError) as e:
        TaskVector.between(zoo["llama/ft1"], zoo["llama/target-narrow"])
    assert len(e.value.problems) == 6
    out = tmp_path / "out"
    with pytest.raises(IncompatibleInputsError):
        a.apply_to(zoo["llama/target-narrow"]).save(out)
    assert_no_output(out)


def test_bound_helper_rejects_a_wrong_coefficient():
    x = torch.linspace(-1, 1, 101, dtype=torch.float64)
    assert_float32_bound(x.float(), x, x.abs())
    with pytest.raises(AssertionError):
        assert_float32_bound((x * 1.001).float(), x, x.abs())


def test_ulp_helper_sanity():
    """The comparison used throughout: adjacent floats are 1 ulp apart, +0 and -0 are 0 apart."""
    x = torch.tensor([1.0, -2.0, 0.0], dtype=torch.bfloat16)
    assert ulp_distance(x, x.clone()) == 0
    one_up = (x.view(torch.int16) + torch.tensor([1, -1, 0], dtype=torch.int16)).view(torch.bfloat16)
    assert ulp_distance(x, one_up) == 1
    assert ulp_distance(torch.tensor([0.0]), torch.tensor([-0.0])) == 0
