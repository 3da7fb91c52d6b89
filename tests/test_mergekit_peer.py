"""Cross-check against a peer: mergekit's ``ties`` (per-tensor top-k) and ``task_arithmetic`` on the
same tiny Llama checkpoints must give the same bf16 weights as surgery's, within one bf16 ulp.

mergekit keeps exactly k = max(1, int(density * numel)) entries per tensor by argsort, surgery every
entry at least the k-th largest magnitude: the same here, since float32 noise has no magnitude ties
at the cut (checked below).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tv_support import assert_ulp, file_dtypes, read_tensors, task_vector

mergekit = pytest.importorskip("mergekit")


def run_mergekit(config: dict, out: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    threads = torch.get_num_threads()
    try:
        run_merge(MergeConfiguration.model_validate(config), str(out),
                  options=MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, device="cpu",
                                       random_seed=0))
    finally:
        torch.set_num_threads(threads)
    return out


def compare(ours: Path, theirs: Path):
    a, b = read_tensors(ours), read_tensors(theirs)
    assert set(a) == set(b), set(a) ^ set(b)
    exact = 0
    for n in a:
        assert a[n].dtype == b[n].dtype == torch.bfloat16, n
        assert_ulp(a[n], b[n], 1, n)
        exact += torch.equal(a[n], b[n])
    return exact, len(a)


def test_ties_per_tensor_matches_mergekit(zoo, tmp_path):
    import surgery

    fts = ["ft1", "ft2", "ft3"]
    weights, density = [1.0, 0.5, 2.0], 0.5
    base = read_tensors(zoo["llama/base"])
    for f in fts:  # no magnitude ties at the top-k cut, so "exactly k" and ">= k-th" agree
        ft = read_tensors(zoo[f"llama/{f}"])
        for n, b in base.items():
            mags = torch.sort(task_vector(ft[n], b).abs().reshape(-1), descending=True).values
            k = max(1, int(density * mags.numel()))
            assert k == mags.numel() or mags[k - 1] != mags[k], (f, n)
    config = {
        "merge_method": "ties",
        "base_model": str(zoo["llama/base"]),
        "models": [{"model": str(zoo[f"llama/{f}"]), "parameters": {"weight": w, "density": density}}
                   for f, w in zip(fts, weights)],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = surgery.merge(zoo["llama/base"], [zoo[f"llama/{f}"] for f in fts], tmp_path / "surgery", method="ties",
                         density=density, weights=weights, dtype="bf16")
    assert set(file_dtypes(ours).values()) == {"BF16"}
    exact, total = compare(ours, theirs)
    assert exact >= total - 2, f"only {exact} of {total} tensors are bit-identical to mergekit's"
    # and the peer check has teeth: trimming really changed the result
    dense = surgery.merge(zoo["llama/base"], [zoo[f"llama/{f}"] for f in fts], tmp_path / "dense", method="ties",
                          density=1.0, weights=weights, dtype="bf16")
    assert any(not torch.equal(v, read_tensors(theirs)[n]) for n, v in read_tensors(dense).items())


def test_task_arithmetic_matches_mergekit(zoo, tmp_path):
    from typer.testing import CliRunner

    from surgery_cli.app import app

    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(zoo["llama/base"]),
        "models": [{"model": str(zoo["llama/ft1"]), "parameters": {"weight": 0.7}},
                   {"model": str(zoo["llama/ft2"]), "parameters": {"weight": 0.5}}],
        "parameters": {"lambda": 0.9},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    theirs = run_mergekit(config, tmp_path / "mergekit")
    ours = tmp_path / "surgery"
    r = CliRunner().invoke(app, ["merge", str(zoo["llama/ft1"]), str(zoo["llama/ft2"]), "--base", str(zoo["llama/base"]),
                                 "--weights", "0.7,0.5", "--lambda", "0.9", "--dtype", "bf16", "-o", str(ours)])
    assert r.exit_code == 0, r.output
    exact, total = compare(ours, theirs)
    assert exact >= total - 2, f"only {exact} of {total} tensors are bit-identical to mergekit's"
