"""The torch-free CPU path gives the same bits as the torch path, and is the one plain runs take."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from surgery.engine.executor import BACKEND_ENV, choose_backend, execute
from surgery.engine.plan import Call, OutputTensor, Plan, Ref
from surgery.errors import SurgeryError
from surgery.io.checkpoint import open_checkpoints
from surgery.io.writer import TensorSpec
from _support import minilm_dir, read_folder, write_st

N = 3 * (1 << 16) + 1234  # several compute blocks, a ragged last one, split over the threads
FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def awkward_values(seed: int) -> torch.Tensor:
    """float64 values that probe rounding: bf16 and fp16 halfway points (ties to even and to odd),
    values just off them, subnormals of every width, overflow to inf, infinities, NaNs, signed zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, generator=g, dtype=torch.float64) * 0.05
    u32 = torch.randint(0, 1 << 16, (4096,), generator=g, dtype=torch.int64)
    halfway = ((u32 << 16) | 0x8000).to(torch.int32).view(torch.float32).to(torch.float64)  # bf16 ties
    x[: halfway.numel()] = halfway
    k = halfway.numel()
    specials = [1 + 2**-8 + 2**-30, 1 + 2**-11 + 2**-40, 1 + 2**-8, 1 + 3 * 2**-8, 2**-130, -2**-140, 1e-45,
                6e-8, 3e-5, 65519.0, 65520.0, 3.4e38, 3.39e38 * 1.004, float("inf"), -float("inf"),
                float("nan"), 0.0, -0.0, 1e-310, -1e300]
    x[k:k + len(specials)] = torch.tensor(specials, dtype=torch.float64)
    return x


def _inputs(tmp_path, dtypes):
    paths = []
    for i, code in enumerate(dtypes):
        v = awkward_values(i)
        write_st(tmp_path / f"m{i}" / "model.safetensors",
                 {"w": v.to(FLOATS[code]), "small": v[:100].clone().to(FLOATS[code]).reshape(10, 10),
                  "ids": torch.arange(7, dtype=torch.int64) + i, "flag": torch.tensor([True, False])})
        paths.append(str(tmp_path / f"m{i}"))
    return open_checkpoints(paths)


def _run(plan, ckpts, folder, backend, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, backend)
    folder.mkdir()
    execute(plan, folder, checkpoints=ckpts, device="cpu")
    return read_folder(folder)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor, what: str):
    """Equal bit patterns, except that any NaN matches any NaN (their payloads are not specified)."""
    assert a.dtype == b.dtype and a.shape == b.shape, what
    if a.is_floating_point():
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        assert torch.equal(nan_a, nan_b), f"{what}: NaNs in different places"
        a, b = a[~nan_a], b[~nan_b]
        ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[a.element_size()]
        a, b = a.view(ints), b.view(ints)
    diff = (a != b).nonzero()
    assert diff.numel() == 0, f"{what}: {diff.numel()} elements differ, first at {diff[:3].tolist()}"


CASES = {
    "mean": lambda refs: Call.of("mean", refs),
    "weighted": lambda refs: Call.of("weighted_sum", refs, weights=[0.7, -0.2, 0.5]),
    "task_arithmetic": lambda refs: Call.of("add", [refs[0], Call.of("scale", [
        Call.of("add", [Call.of("sub", [refs[1], refs[0]]), Call.of("sub", [refs[2], refs[0]])])], factor=0.3)]),
}


def _reference(case: str, xs: list[torch.Tensor], compute: torch.dtype) -> torch.Tensor:
    """The same arithmetic written out on whole float tensors."""
    c = [x.to(torch.promote_types(x.dtype, compute)) for x in xs]
    if case == "mean":
        return (c[0] + c[1] + c[2]) / 3
    if case == "weighted":
        return c[0] * 0.7 + c[1] * -0.2 + c[2] * 0.5
    return c[0] + ((c[1] - c[0]) + (c[2] - c[0])) * 0.3


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("in_dtypes,out_dtype,compute", [
    (("BF16", "BF16", "BF16"), "BF16", "F32"),
    (("BF16", "F16", "F32"), "BF16", "F64"),
    (("F16", "F16", "F16"), "F16", "F32"),
    (("F32", "BF16", "F64"), "F16", "F64"),
    (("F32", "F32", "F32"), "F32", "F64"),
    (("BF16", "BF16", "BF16"), "F64", "F32"),
])
def test_numpy_path_matches_torch_path_bit_for_bit(tmp_path, monkeypatch, case, in_dtypes, out_dtype, compute):
    ckpts = _inputs(tmp_path, in_dtypes)
    refs = [Ref(i, "w") for i in range(3)]
    small = [Ref(i, "small") for i in range(3)]
    plan = Plan([c.source for c in ckpts], [
        OutputTensor(TensorSpec("flag", "BOOL", (2,)), Call.of("copy", [Ref(1, "flag")])),
        OutputTensor(TensorSpec("ids", "I64", (7,)), Ref(2, "ids")),
        OutputTensor(TensorSpec("small", out_dtype, (10, 10)), CASES[case](small)),
        OutputTensor(TensorSpec("w", out_dtype, (N,)), CASES[case](refs)),
        OutputTensor(TensorSpec("w_cast", out_dtype, (N,)), Ref(0, "w")),  # a plain dtype conversion
    ], max_shard_size="300KB", compute_dtype=compute)
    assert choose_backend(plan, ckpts, "cpu") == "numpy"
    by_numpy = _run(plan, ckpts, tmp_path / "numpy", "numpy", monkeypatch)
    by_torch = _run(plan, ckpts, tmp_path / "torch", "torch", monkeypatch)
    assert sorted(by_numpy) == sorted(by_torch) == ["flag", "ids", "small", "w", "w_cast"]
    for name in by_numpy:
        assert_same_bits(by_numpy[name], by_torch[name], name)
    xs = [c.read("w", "cpu") for c in ckpts]
    expected = _reference(case, xs, FLOATS[compute]).to(FLOATS[out_dtype])
    assert_same_bits(by_numpy["w"], expected, "w against the written-out reference")
    assert_same_bits(by_numpy["w_cast"], xs[0].to(FLOATS[out_dtype]), "w_cast")
    assert torch.equal(by_numpy["ids"], torch.arange(7) + 2) and by_numpy["flag"].tolist() == [True, False]


def test_tensors_that_need_torch_take_it_and_the_rest_stay_on_numpy(tmp_path, monkeypatch):
    ckpts = _inputs(tmp_path, ("F32", "BF16", "F32"))
    refs = [Ref(i, "w") for i in range(3)]
    ties = Plan([c.source for c in ckpts], [
        OutputTensor(TensorSpec("w", "F32", (N,)), Call.of("sign_consensus_mean", refs, weights=[1.0, 1.0, 1.0])),
        OutputTensor(TensorSpec("small", "BF16", (10, 10)), Call.of("mean", [Ref(i, "small") for i in range(3)])),
        OutputTensor(TensorSpec("ids", "I64", (7,)), Ref(0, "ids"))], compute_dtype="F64")
    assert choose_backend(ties, ckpts, "cpu") == "mixed"
    integer_sum = Plan([c.source for c in ckpts], [OutputTensor(TensorSpec("ids", "I64", (7,)),
                       Call.of("add", [Ref(0, "ids"), Ref(1, "ids")]))])
    assert choose_backend(integer_sum, ckpts, "cpu") == "mixed"  # integer promotion differs in numpy: torch
    mixed = _run(ties, ckpts, tmp_path / "mixed", "", monkeypatch)
    by_torch = _run(ties, ckpts, tmp_path / "torch", "torch", monkeypatch)
    for name in by_torch:
        assert_same_bits(mixed[name], by_torch[name], name)
    soup = Plan([c.source for c in ckpts], [OutputTensor(TensorSpec("w", "F32", (N,)), Call.of("mean", refs))])
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert choose_backend(soup, ckpts, "cpu") == "torch"
    assert choose_backend(ties, ckpts, "cpu") == "torch"
    monkeypatch.setenv(BACKEND_ENV, "numpy")
    with pytest.raises(SurgeryError, match="needs torch"):
        choose_backend(ties, ckpts, "cpu")
    monkeypatch.setenv(BACKEND_ENV, "jax")
    with pytest.raises(SurgeryError, match="torch or numpy"):
        choose_backend(soup, ckpts, "cpu")


_NO_TORCH = """
import sys
from surgery_cli.app import app
try:
    app(sys.argv[1:])
except SystemExit as e:
    assert not e.code, e.code
assert "torch" not in sys.modules, "torch was imported"
print("no torch")
"""


@pytest.mark.parametrize("command", [
    ["soup", "{m}", "{m}", "-o", "{out}"],
    ["merge", "--method", "task_arithmetic", "--base", "{m}", "{m}", "{m}", "-o", "{out}"],
    ["transfer", "--source-base", "{m}", "--source-ft", "{m}", "--to", "{m}", "-o", "{out}"],
])
def test_soups_and_task_arithmetic_run_without_importing_torch(tmp_path, command):
    m = str(minilm_dir())
    args = [a.format(m=m, out=tmp_path / "out") for a in command] + ["--device", "cpu", "-q"]
    env = {k: v for k, v in os.environ.items() if k != BACKEND_ENV}
    done = subprocess.run([sys.executable, "-c", _NO_TORCH, *args], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "no torch" in done.stdout
    original = read_folder(minilm_dir())
    for name, t in read_folder(tmp_path / "out").items():  # every combination of identical models is the model
        assert torch.equal(t, original[name]), name  # by value: base + (+0.0) turns a -0.0 into +0.0
