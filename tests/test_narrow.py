"""Float64 task arithmetic on bf16 inputs, evaluated in float32 where provably exact: same bits.

The float32 evaluation is compared with the float64 one on the numpy path (``SURGERY_NARROW=0``)
and with the torch path, on data that reaches every branch: blocks checked clean, blocks with a
few elements recomputed, blocks mostly recomputed, and blocks with infinities and NaNs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from surgery.engine.narrow import NARROW_ENV, RANGE, plan_narrow
from surgery.engine.numpy_compute import NARROW_BLOCK_ELEMENTS as BLOCK_ELEMENTS  # the float32 path's blocks
from surgery.engine.plan import Call, OutputTensor, Plan, Ref
from surgery.io.writer import TensorSpec
from surgery.ops.common import compute_dtype
from test_numpy_path import _run, assert_same_bits, awkward_values
from _support import write_st

BLOCKS = 6
N = BLOCKS * BLOCK_ELEMENTS + 777


def _bits(x: np.ndarray) -> np.ndarray:
    """float32 values to bf16 bits, truncated (any bf16 values will do as inputs)."""
    with np.errstate(over="ignore"):
        return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _value(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _models(seed: int = 0) -> list[np.ndarray]:
    """A base and two fine-tunes as bf16 bits, block by block:
    0: close fine-tunes, a few base weights far smaller than the deltas (those elements recomputed),
       and weights a fine-tune left alone (zero deltas: signed zeros);
    1: as 0 with exact zeros and subnormals sprinkled in;
    2: unrelated values of every magnitude from 2**-60 to 2**29 (mostly flagged: the whole block
       recomputed in float64);
    3: as 0 with an infinity and a NaN (a non-finite result: the whole block in float64);
    4: as 0 with values near float32's overflow, one difference overflowing float32 though the
       result does not (outside the range: the whole block in float64);
    5 and the ragged rest: the awkward values (rounding ties, specials) as the base."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 0.02, N)
    base[rng.choice(BLOCK_ELEMENTS, 40, replace=False)] = rng.normal(0, 1e-12, 40)  # far below the deltas
    fts = [base + rng.normal(0, 2e-4, N), base + rng.normal(0, 2e-4, N)]
    models = [_bits(x) for x in [base, *fts]]
    same = rng.choice(BLOCK_ELEMENTS, 500, replace=False)
    models[1][same] = models[0][same]  # weights the fine-tune left alone: exact zero deltas
    models[2][same[:250]] = models[0][same[:250]]
    for m in models:
        pick = rng.choice(BLOCK_ELEMENTS, 300, replace=False) + BLOCK_ELEMENTS
        m[pick[:150]] = 0
        m[pick[150:]] = rng.integers(1, 0x7F, 150) | (rng.integers(0, 2, 150) << 15)  # subnormals
        exponents = rng.integers(67, 157, BLOCK_ELEMENTS)  # 2**-60 to 2**29: far apart, yet within range
        m[2 * BLOCK_ELEMENTS:3 * BLOCK_ELEMENTS] = (exponents << 7) | rng.integers(0, 1 << 7, BLOCK_ELEMENTS) | \
            (rng.integers(0, 2, BLOCK_ELEMENTS) << 15)
    models[1][3 * BLOCK_ELEMENTS + 5] = 0x7F80  # +inf
    models[2][3 * BLOCK_ELEMENTS + 9] = 0x7FC1  # NaN
    for m, bits in zip(models, (0x7F80, 0x7800, 0x7801)):  # an infinite base beside large fine-tunes:
        m[BLOCK_ELEMENTS + 20] = bits  # (ft - base) + base is NaN, though ft is finite
    for m in models:
        m[4 * BLOCK_ELEMENTS + 11] = _bits(np.array([3.3e38]))[0]
    for m, v in zip(models, (-3e38, 3e38, -3e38)):  # ft - base overflows float32, the result does not
        m[4 * BLOCK_ELEMENTS + 12] = _bits(np.array([v]))[0]
    models[0][5 * BLOCK_ELEMENTS:] = np.resize(_bits(awkward_values(seed).numpy()), N - 5 * BLOCK_ELEMENTS)
    return models


TREES = {
    "transfer": lambda r: Call.of("add", [r[2], Call.of("sub", [r[1], r[0]])]),
    "task_arithmetic": lambda r: Call.of("add", [r[0], Call.of("weighted_sum", [
        Call.of("sub", [r[1], r[0]]), Call.of("sub", [r[2], r[0]])], weights=[1.0, 1.0])]),
    "integer_weights": lambda r: Call.of("add", [r[0], Call.of("weighted_sum", [
        Call.of("sub", [r[1], r[0]]), Call.of("sub", [r[2], r[0]])], weights=[3.0, -1.0])]),
    "negated_scaled": lambda r: Call.of("add", [r[0], Call.of("scale", [Call.of("sub", [r[0], r[1]])], factor=-3.0)]),
    "three_terms": lambda r: Call.of("add", [r[0], Call.of("sub", [r[1], r[0]]), Call.of("sub", [r[2], r[0]])]),
    # float32 adds r0 - r1 - r2 up from r0 (no negation): a partial sum the tree itself never forms
    "minus_sum": lambda r: Call.of("add", [r[0], Call.of("scale", [Call.of("add", [r[1], r[2]])], factor=-1.0)]),
    # -(ft - base): -0 wherever ft == base in float64, +0 from float32's ft + -base
    "negated_delta": lambda r: Call.of("scale", [Call.of("sub", [r[1], r[0]])], factor=-1.0),
}
# trees that stay in float64: a zero factor, and a leaf that cancels out (its infinity would go unseen)
WIDE_TREES = {
    "zero_scale": lambda r: Call.of("add", [r[2], Call.of("scale", [Call.of("sub", [r[1], r[0]])], factor=0.0)]),
    "difference_of_deltas": lambda r: Call.of("sub", [Call.of("sub", [r[1], r[0]]), Call.of("sub", [r[2], r[0]])]),
    "cancelled_base": lambda r: Call.of("add", [Call.of("sub", [r[1], r[0]]), r[0]]),
}


def test_float32_applies_exactly_where_it_can():
    refs = [Ref(i, "w") for i in range(3)]
    bf16 = {r: "BF16" for r in refs}
    with compute_dtype("F64"):
        for name, tree in TREES.items():
            assert plan_narrow(tree(refs), bf16, "BF16") is not None, name
            assert plan_narrow(tree(refs), bf16, "F32") is not None, name
        transfer = plan_narrow(TREES["transfer"](refs), bf16, "BF16")
        assert [([r.input for r in g], h) for g, h in transfer.groups] == [([1, 0], 15)]  # only ft - base
        ta = plan_narrow(TREES["task_arithmetic"](refs), bf16, "BF16")
        assert [([r.input for r in g], h) for g, h in ta.groups] == [([0, 1, 2], 14)]  # the sum of the two deltas
        assert [(r.input, c) for r, c in ta.terms] == [(1, 1), (0, -1), (2, 1)]  # added up as m1 - b + m2
        minus = plan_narrow(TREES["minus_sum"](refs), bf16, "BF16")
        assert [(r.input, c) for r, c in minus.terms] == [(0, 1), (1, -1), (2, -1)]
        assert sorted([r.input for r in g] for g, _ in minus.groups) == [[0, 1], [1, 2]]
        # not exact in general: a weight that is not an integer, a division, other inputs or outputs
        scaled = Call.of("add", [refs[2], Call.of("scale", [Call.of("sub", [refs[1], refs[0]])], factor=0.3)])
        assert plan_narrow(scaled, bf16, "BF16") is None
        assert plan_narrow(Call.of("mean", refs), bf16, "BF16") is None
        for name, tree in WIDE_TREES.items():
            assert plan_narrow(tree(refs), bf16, "BF16") is None, name
        assert plan_narrow(TREES["transfer"](refs), {**bf16, refs[0]: "F32"}, "BF16") is None
        assert plan_narrow(TREES["transfer"](refs), {**bf16, refs[0]: "F16"}, "BF16") is None
        assert plan_narrow(TREES["transfer"](refs), bf16, "F64") is None
    with compute_dtype("F32"):  # a float32 plan is float32 already
        assert plan_narrow(TREES["transfer"](refs), bf16, "BF16") is None


def test_unflagged_elements_are_exact_in_float32():
    """The checks are sound: wherever the bit check passes and the float32 result is within the
    range, float32 computed every inner step exactly (against float64, which holds these sums
    exactly), over all exponents and signs."""
    rng = np.random.default_rng(1)
    n = 1 << 20
    base = rng.integers(0, 1 << 16, n).astype(np.uint16)
    base[(base & 0x7F80) == 0x7F80] = 0x3F80  # finite values only: the range check handles the rest
    near = (base.astype(np.int32) + rng.integers(-(16 << 7), 16 << 7, n)) & 0xFFFF
    near = np.where((near & 0x7F80) == 0x7F80, base, near).astype(np.uint16)
    near ^= (rng.integers(0, 2, n) << 15).astype(np.uint16)  # signs at random: crossing zero is allowed
    other = (base.astype(np.int32) + rng.integers(-(16 << 7), 16 << 7, n)) & 0xFFFF
    other = np.where((other & 0x7F80) == 0x7F80, base, other).astype(np.uint16)
    refs = [Ref(i, "w") for i in range(3)]
    raw = dict(zip(refs, [base, near, other]))
    with compute_dtype("F64"):
        transfer = plan_narrow(TREES["transfer"](refs), {r: "BF16" for r in refs}, "BF16")
        ta = plan_narrow(TREES["task_arithmetic"](refs), {r: "BF16" for r in refs}, "BF16")
    b, f, g = (_value(x) for x in (base, near, other))
    with np.errstate(all="ignore"):
        d32 = f - b
        d64 = f.astype(np.float64) - b.astype(np.float64)
        s32 = (f - b) + (g - b)
        s64 = (f.astype(np.float64) - b) + (g.astype(np.float64) - b)
    for plan, v32, v64 in ((transfer, d32, d64), (ta, s32, s64)):
        flagged = plan.flagged(raw)
        ok = np.abs(v32) < RANGE  # beyond it (overflow to inf included) the block is redone in float64
        ok[flagged] = False
        assert 0.05 < ok.mean() < 0.999  # both outcomes are well represented
        assert np.array_equal(v32[ok].astype(np.float64), v64[ok])
        inexact = v32.astype(np.float64) != v64
        assert inexact.any() and not (inexact & ok).any()


def _plan(ckpts, tree, out_dtype):
    refs = [Ref(i, "w") for i in range(3)]
    return Plan([c.source for c in ckpts], [OutputTensor(TensorSpec("w", out_dtype, (N,)), tree(refs))],
                compute_dtype="F64")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from surgery.io.checkpoint import open_checkpoints

    root = tmp_path_factory.mktemp("narrow")
    for i, bits in enumerate(_models()):
        write_st(root / f"m{i}" / "model.safetensors",
                 {"w": torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)})
    return open_checkpoints([str(root / f"m{i}") for i in range(3)])


def test_the_data_reaches_every_branch(inputs):
    """Block 0 has a few elements recomputed, block 2 most of them, blocks 3 and 4 fall back whole."""
    refs = [Ref(i, "w") for i in range(3)]
    raw = {r: _models()[r.input] for r in refs}
    with compute_dtype("F64"):
        plan = plan_narrow(TREES["task_arithmetic"](refs), {r: "BF16" for r in refs}, "BF16")
    counts = []
    for k in range(BLOCKS):
        block = {r: a[k * BLOCK_ELEMENTS:(k + 1) * BLOCK_ELEMENTS] for r, a in raw.items()}
        flagged = plan.flagged(block)
        counts.append(0 if flagged is None else flagged.size)
    assert 0 < counts[0] < BLOCK_ELEMENTS // 100 and counts[1] > counts[0]
    assert counts[2] > BLOCK_ELEMENTS // 2
    with np.errstate(all="ignore"):
        v = [_value(raw[r]).astype(np.float64) for r in refs]
        result = v[0] + (v[1] - v[0]) + (v[2] - v[0])
    for k in (3, 4):
        part = result[k * BLOCK_ELEMENTS:(k + 1) * BLOCK_ELEMENTS]
        assert not (np.abs(part) < RANGE).all()


@pytest.mark.parametrize("tree", sorted(TREES) + sorted(WIDE_TREES))
@pytest.mark.parametrize("out_dtype", ["BF16", "F32", "F16"])
def test_float32_evaluation_gives_float64_bits(tmp_path, monkeypatch, inputs, tree, out_dtype):
    plan = _plan(inputs, {**TREES, **WIDE_TREES}[tree], out_dtype)
    narrow = _run(plan, inputs, tmp_path / "narrow", "numpy", monkeypatch)["w"]
    monkeypatch.setenv(NARROW_ENV, "0")
    wide = _run(plan, inputs, tmp_path / "wide", "numpy", monkeypatch)["w"]
    by_torch = _run(plan, inputs, tmp_path / "torch", "torch", monkeypatch)["w"]
    assert_same_bits(narrow, wide, f"{tree}: float32 against float64 on numpy")
    assert_same_bits(narrow, by_torch, f"{tree}: float32 against float64 on torch")
