"""``surgery merge``: task arithmetic, TIES (per tensor and global), DARE (linear and TIES).

Hand-made tensors pin the sign election and the disjoint mean down to the coordinate; real tiny models
check the whole pipeline against float64 brute force computed here.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tv_support import (assert_float32_bound, assert_no_output, assert_ulp, read_tensors, task_vector,
                        ties_merge, topk_mask, write_checkpoint)


def op(name):
    from surgery.ops.registry import get_operation

    return get_operation(name).fn


# ---------------------------------------------------------------------------------------------
# Hand-made tensors: 8 coordinates, 3 tasks, weights 1, 2, 0.5

TAUS = [
    [0.5, 1.0, 0.25, 0.5, -1.0, 0.0, 0.0, -0.5],
    [0.25, -0.25, -0.5, -0.25, 0.25, 0.0, 0.0, -0.5],
    [1.0, -0.5, 0.5, 0.0, 1.0, 0.0, -0.75, -0.5],
]
WEIGHTS = [1.0, 2.0, 0.5]
# worked by hand: weighted terms, their sum's sign (0 goes to +), agreeing terms / agreeing weight
HAND = [
    (0.5 + 0.5 + 0.5) / 3.5,  # all agree
    1.0 / 1.0,  # 1 - 0.5 - 0.25 > 0: only task 0 agrees
    -1.0 / 2.0,  # 0.25 - 1 + 0.25 < 0: only task 1 agrees
    0.5 / 1.0,  # 0.5 - 0.5 + 0 = 0 -> +: task 0
    (0.5 + 0.5) / 2.5,  # -1 + 0.5 + 0.5 = 0 -> +: tasks 1 and 2
    0.0,  # nothing moves
    -0.375 / 0.5,  # only task 2, negative
    (-0.5 - 1.0 - 0.25) / 3.5,  # all agree, negative
]


def test_sign_election_and_disjoint_mean_by_hand():
    taus = [torch.tensor(t, dtype=torch.float32).reshape(2, 4) for t in TAUS]
    got = op("sign_consensus_mean")(taus, weights=WEIGHTS)
    assert got.shape == (2, 4)
    want = torch.tensor(HAND, dtype=torch.float64).reshape(2, 4)
    assert_ulp(got.float(), want.float(), 1, "weighted")
    assert torch.allclose(ties_merge(taus, WEIGHTS), want, rtol=0, atol=1e-12)  # the reference agrees by hand
    # unweighted: coordinate 3 is 0.5 - 0.25 + 0 > 0 and coordinate 4 is -1 + 0.25 + 1 > 0
    got1 = op("sign_consensus_mean")(taus, weights=[1.0, 1.0, 1.0]).reshape(-1)
    assert got1[3].item() == 0.5 and got1[4].item() == pytest.approx((0.25 + 1.0) / 2)
    assert got1[1].item() == 1.0  # 1 - 0.25 - 0.5 > 0


def test_trim_topk_by_hand():
    from surgery.ops.ties import topk_threshold

    t = torch.tensor([0.1, -0.5, 0.3, -0.2, 0.05, 0.4])

    def keep(x, density):
        threshold = topk_threshold(x.abs().clone(), density)
        return op("trim_threshold")([x], threshold=threshold)

    assert keep(t, 0.5).tolist() == pytest.approx([0, -0.5, 0.3, 0, 0, 0.4])  # k = 3
    assert keep(t, 0.1).tolist() == pytest.approx([0, -0.5, 0, 0, 0, 0])  # k = max(1, 0) = 1
    assert torch.equal(keep(t, 1.0), t)
    tied = torch.tensor([0.3, -0.3, 0.1, 0.2])
    assert keep(tied, 0.25).tolist() == pytest.approx([0.3, -0.3, 0, 0])  # |x| >= 1st largest
    assert op("trim_threshold")([t], threshold=0.3).tolist() == pytest.approx([0, -0.5, 0.3, 0, 0, 0.4])


def _handmade_family(root: Path):
    """base and three models whose differences are TAUS exactly (all values are multiples of 1/8),
    plus a tensor for trimming and an integer buffer."""
    base_a = torch.arange(8, dtype=torch.float32).reshape(2, 4) / 8 - 0.5
    base_b = torch.tensor([0.5, -0.25, 0.75, 1.0, 0.0, -0.5])
    trims = [[0.125, -1.0, 0.5, 0.25, -0.375, 0.0625],
             [-0.5, 0.25, -0.125, 1.5, 0.75, -0.25],
             [0.375, 0.5, 1.25, -0.75, -0.0625, 0.125]]
    config = {"model_type": "handmade", "tie_word_embeddings": False}
    ids = torch.arange(5, dtype=torch.int64)
    base = write_checkpoint(root / "base", {"a.weight": base_a, "b.weight": base_b, "ids": ids}, config)
    models = []
    for i, (tau, trim) in enumerate(zip(TAUS, trims)):
        models.append(write_checkpoint(root / f"m{i}", {
            "a.weight": base_a + torch.tensor(tau).reshape(2, 4), "b.weight": base_b + torch.tensor(trim),
            "ids": ids + 10 * (i + 1)}, config))
    return base, models


def test_ties_end_to_end_on_handmade_checkpoints(cli, tmp_path):
    base, models = _handmade_family(tmp_path)
    b = read_tensors(base)
    taus = {n: [task_vector(read_tensors(m)[n], b[n]) for m in models] for n in ("a.weight", "b.weight")}
    # density 1: no trimming, the hand-worked consensus
    out = tmp_path / "ties1"
    cli("merge", *models, "--base", base, "--method", "ties", "--density", 1, "--weights", "1,2,0.5", "-o", out)
    got = read_tensors(out)
    assert_ulp(got["a.weight"], (b["a.weight"].double() + torch.tensor(HAND, dtype=torch.float64).reshape(2, 4)).float(),
               1, "a.weight")
    assert torch.equal(got["ids"], b["ids"]), "integer tensors come from the base"
    # density 0.5 and lambda 0.5: per tensor, a.weight keeps 4 of 8 and b.weight 3 of 6 per task
    out = tmp_path / "ties05"
    cli("merge", *models, "--base", base, "--method", "ties", "--density", 0.5, "--weights", "1,2,0.5",
        "--lambda", 0.5, "-o", out)
    got = read_tensors(out)
    for n, ts in taus.items():
        trimmed = [torch.where(topk_mask(t, 0.5), t, torch.zeros_like(t)) for t in ts]
        if n == "b.weight":  # distinct magnitudes: exactly k = 3 kept per task
            assert all(int((x != 0).sum()) == 3 for x in trimmed)
        want = (b[n].double() + 0.5 * ties_merge(trimmed, WEIGHTS)).float()
        assert_ulp(got[n], want, 1, n)
    # trimming made a difference: without it the result is another one
    untrimmed = (b["b.weight"].double() + 0.5 * ties_merge(taus["b.weight"], WEIGHTS)).float()
    assert not torch.equal(got["b.weight"], untrimmed)


def test_ties_handmade_library_call(tmp_path):
    import surgery

    base, models = _handmade_family(tmp_path)
    out = surgery.merge(base, models, tmp_path / "out", method="ties", density=1.0, weights=WEIGHTS)
    got, b = read_tensors(out), read_tensors(base)
    want = (b["a.weight"].double() + torch.tensor(HAND, dtype=torch.float64).reshape(2, 4)).float()
    assert_ulp(got["a.weight"], want, 1)


# ---------------------------------------------------------------------------------------------
# Real tiny models


def _taus(zoo, fam, fts):
    b = read_tensors(zoo[f"{fam}/base"])
    return b, [{n: task_vector(read_tensors(zoo[f"{fam}/{f}"])[n], b[n]) for n in b} for f in fts]


def test_task_arithmetic_matches_reference(zoo, cli, tmp_path):
    b, taus = _taus(zoo, "llama", ["ft1", "ft2"])
    out = tmp_path / "ta"
    cli("merge", zoo["llama/ft1"], zoo["llama/ft2"], "--base", zoo["llama/base"], "--weights", "0.7,0.5",
        "--lambda", 0.9, "-o", out)
    got = read_tensors(out)
    assert set(got) == set(b)
    for n, v in got.items():
        merged = 0.7 * taus[0][n].double() + 0.5 * taus[1][n].double()
        size = b[n].double().abs() + 0.9 * (0.7 * taus[0][n].abs() + 0.5 * taus[1][n].abs()).double()
        assert v.dtype == torch.float32
        assert_float32_bound(v, b[n].double() + 0.9 * merged, size, n)
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((zoo["llama/base"] / "config.json").read_text())


def _same_tensors(a: Path, b: Path):
    x, y = read_tensors(a), read_tensors(b)
    assert set(x) == set(y)
    for n in x:
        assert x[n].dtype == y[n].dtype and torch.equal(x[n], y[n]), n


def test_ties_one_task_full_density_is_task_arithmetic(zoo, cli, tmp_path):
    base, ft = zoo["llama/base"], zoo["llama/ft1"]
    cli("merge", ft, "--base", base, "--method", "ties", "--density", 1, "--lambda", 0.8, "-o", tmp_path / "ties")
    cli("merge", ft, "--base", base, "--method", "task_arithmetic", "--lambda", 0.8, "-o", tmp_path / "ta")
    _same_tensors(tmp_path / "ties", tmp_path / "ta")
    b, (tau,) = _taus(zoo, "llama", ["ft1"])
    got = read_tensors(tmp_path / "ties")
    for n in b:
        assert_float32_bound(got[n], b[n].double() + 0.8 * tau[n].double(),
                             b[n].double().abs() + 0.8 * tau[n].double().abs(), n)


def test_ties_per_tensor_matches_brute_force(zoo, tmp_path):
    import surgery

    b, taus = _taus(zoo, "llama", ["ft1", "ft2", "ft3"])
    weights = [1.0, 0.5, 2.0]
    out = surgery.merge(zoo["llama/base"], [zoo["llama/ft1"], zoo["llama/ft2"], zoo["llama/ft3"]], tmp_path / "o",
                        method="ties", density=0.3, weights=weights, lam=0.9, dtype="bf16")
    got = read_tensors(out)
    for n in b:
        trimmed = [torch.where(topk_mask(t[n], 0.3), t[n], torch.zeros_like(t[n])) for t in taus]
        want = b[n].double() + 0.9 * ties_merge(trimmed, weights)
        assert got[n].dtype == torch.bfloat16
        assert_float32_bound(got[n], want, b[n].double().abs() + 0.9 * sum(t[n].double().abs() for t in taus) * 2, n)


def test_ties_global_scope_matches_brute_force(zoo, tmp_path):
    """One threshold per task over every float entry of the model, then consensus."""
    import surgery
    from surgery.lazy import TaskVector
    from surgery.recipes.merge import merged_vector

    fts = ["ft1", "ft2", "ft3"]
    b, taus = _taus(zoo, "llama", fts)
    weights, density = [1.0, 0.5, 2.0], 0.3
    names = list(b)
    thresholds, trimmed = [], []
    for tau in taus:
        flat = torch.cat([tau[n].abs().reshape(-1) for n in names])
        k = max(1, int(density * flat.numel()))
        thr = torch.sort(flat, descending=True).values[k - 1]
        thresholds.append(float(thr))
        trimmed.append({n: torch.where(tau[n].abs() >= thr, tau[n], torch.zeros_like(tau[n])) for n in names})
    paths = [zoo[f"llama/{f}"] for f in fts]
    tvs = [TaskVector.between(p, zoo["llama/base"]) for p in paths]
    _, info = merged_vector("ties", tvs, weights, density, scope="global", device="cpu")
    assert info["thresholds"] == thresholds
    out = surgery.merge(zoo["llama/base"], paths, tmp_path / "g", method="ties", density=density, weights=weights,
                        scope="global", lam=0.9, dtype="bf16")
    got = read_tensors(out)
    differs_from_per_tensor = False
    for n in names:
        want = b[n].double() + 0.9 * ties_merge([t[n] for t in trimmed], weights)
        size = b[n].double().abs() + 0.9 * sum(t[n].double().abs() for t in taus) * 2
        assert_float32_bound(got[n], want, size, n)
        per_tensor = [torch.where(topk_mask(t[n], density), t[n], torch.zeros_like(t[n])) for t in taus]
        if not all(torch.equal(x != 0, y[n] != 0) for x, y in zip(per_tensor, trimmed)):
            alt = (b[n].double() + 0.9 * ties_merge(per_tensor, weights)).to(torch.bfloat16)
            differs_from_per_tensor |= not torch.equal(alt, got[n])
    assert differs_from_per_tensor, "this case must tell global scope from per-tensor scope"
    from surgery_cli.app import app

    r = CliRunner().invoke(app, ["merge", *map(str, paths), "--base", str(zoo["llama/base"]), "--method", "ties",
                                 "--density", str(density), "--weights", "1,0.5,2", "--scope", "global",
                                 "--lambda", "0.9", "--dtype", "bf16", "-o", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    _same_tensors(tmp_path / "cli", out)


def test_ties_global_threshold_counts_across_tensors_by_hand(tmp_path):
    """Two tensors, one task: global top-3 of all 8 magnitudes is {4, 3, 2.5}, all in the first tensor
    but one; per tensor it would keep the top 1 of each."""
    import surgery

    config = {"model_type": "handmade", "tie_word_embeddings": False}
    base = write_checkpoint(tmp_path / "base", {"x.weight": torch.zeros(4), "y.weight": torch.zeros(4)}, config)
    ft = write_checkpoint(tmp_path / "ft", {"x.weight": torch.tensor([4.0, -3.0, 0.5, 1.0]),
                                            "y.weight": torch.tensor([0.25, 2.5, -2.0, 0.125])}, config)
    got = read_tensors(surgery.merge(base, [ft], tmp_path / "g", method="ties", density=3 / 8, scope="global"))
    assert got["x.weight"].tolist() == [4.0, -3.0, 0.0, 0.0]
    assert got["y.weight"].tolist() == [0.0, 2.5, 0.0, 0.0]
    got = read_tensors(surgery.merge(base, [ft], tmp_path / "t", method="ties", density=3 / 8, scope="tensor"))
    assert got["x.weight"].tolist() == [4.0, 0.0, 0.0, 0.0]  # k = max(1, int(0.375 * 4)) = 1
    assert got["y.weight"].tolist() == [0.0, 2.5, 0.0, 0.0]
    got = read_tensors(surgery.merge(base, [ft], tmp_path / "g1", method="ties", density=1 / 8, scope="global"))
    assert got["x.weight"].tolist() == [4.0, 0.0, 0.0, 0.0] and got["y.weight"].tolist() == [0.0] * 4
    got = read_tensors(surgery.merge(base, [ft], tmp_path / "g6", method="ties", density=6 / 8, scope="global"))
    assert got["x.weight"].tolist() == [4.0, -3.0, 0.5, 1.0]  # top 6: 4, 3, 2.5, 2, 1, 0.5
    assert got["y.weight"].tolist() == [0.0, 2.5, -2.0, 0.0]
    got = read_tensors(surgery.merge(base, [ft], tmp_path / "gall", method="ties", density=1.0, scope="global"))
    assert got["x.weight"].tolist() == [4.0, -3.0, 0.5, 1.0] and got["y.weight"].tolist() == [0.25, 2.5, -2.0, 0.125]


# ---------------------------------------------------------------------------------------------
# DARE


def test_dare_drop_zero_is_identity():
    t = torch.randn(10, 10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(op("dare_drop")([t], p=0.0, seed=3), t)


def test_dare_mean_over_seeds_is_the_delta():
    """E[drop(tau)] = tau; over n seeds each entry's mean is within 5 standard errors
    (|tau| * sqrt(p / ((1-p) n))) of tau, and the kept fraction within 5 binomial sigmas of 1-p."""
    p, n = 0.6, 200
    tau = torch.randn(64, generator=torch.Generator().manual_seed(2)) * 0.01 + 0.002
    samples = torch.stack([op("dare_drop")([tau], p=p, seed=s) for s in range(n)]).double()
    mean = samples.mean(0)
    se = tau.double().abs() * math.sqrt(p / ((1 - p) * n))
    assert ((mean - tau.double()).abs() <= 5 * se + 1e-12).all(), float(((mean - tau.double()).abs() / se).max())
    kept = int((samples != 0).sum())
    total = samples.numel()
    assert abs(kept - (1 - p) * total) <= 5 * math.sqrt(total * p * (1 - p))
    assert len({tuple((s != 0).tolist()) for s in samples}) > n // 2, "masks must change with the seed"


@pytest.mark.parametrize("p", [0.5, 0.75, 0.9, 0.3])
def test_dare_rescale_is_exactly_one_over_keep(p):
    tau = torch.randn(4096, generator=torch.Generator().manual_seed(4)) * 0.02
    assert (tau != 0).all()
    got = op("dare_drop")([tau], p=p, seed=11)
    kept = got != 0
    factor = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)
    assert got.dtype == torch.float32
    assert torch.equal(got[kept], tau[kept] * factor), "kept entries are tau * (1/(1-p)) bit for bit"
    assert torch.equal(got[~kept], torch.zeros(int((~kept).sum())))
    assert abs(int(kept.sum()) - (1 - p) * 4096) <= 5 * math.sqrt(4096 * p * (1 - p))
    assert torch.equal(op("dare_drop")([tau], p=p, seed=11), got)
    assert not torch.equal(op("dare_drop")([tau], p=p, seed=12), got)


def test_dare_full_density_is_task_arithmetic_and_ties(zoo, cli, tmp_path):
    fts = [zoo["llama/ft1"], zoo["llama/ft2"]]
    base = zoo["llama/base"]
    common = ["--base", base, "--weights", "0.7,0.5", "--seed", 9]
    cli("merge", *fts, *common, "--method", "dare_linear", "--density", 1, "-o", tmp_path / "dl")
    cli("merge", *fts, *common, "--method", "task_arithmetic", "-o", tmp_path / "ta")
    _same_tensors(tmp_path / "dl", tmp_path / "ta")
    cli("merge", *fts, *common, "--method", "dare_ties", "--density", 1, "-o", tmp_path / "dt")
    cli("merge", *fts, *common, "--method", "ties", "--density", 1, "-o", tmp_path / "ti")
    _same_tensors(tmp_path / "dt", tmp_path / "ti")


def test_dare_linear_end_to_end_rescale_and_rate(zoo, tmp_path):
    """One task, density 0.25: every entry of the merged vector is 0 or exactly 4 * tau."""
    from surgery.lazy import TaskVector
    from surgery.recipes.merge import merged_vector

    tv = TaskVector.between(zoo["llama/ft1"], zoo["llama/base"])
    merged, info = merged_vector("dare_linear", [tv], [1.0], 0.25, seed=5, device="cpu")
    assert info["p"] == 0.75
    got = read_tensors(merged.save(tmp_path / "m"))
    _, (tau,) = _taus(zoo, "llama", ["ft1"])
    kept_total = total = 0
    masks = []
    base, ft = read_tensors(zoo["llama/base"]), read_tensors(zoo["llama/ft1"])
    for n, v in got.items():
        kept = v != 0
        # a saved vector of float32 models is float64: exactly 4 * (ft - base) in float64
        assert v.dtype == torch.float64, n
        assert torch.equal(v[kept], (ft[n].double() - base[n].double())[kept] * 4.0), n
        assert torch.equal(v[kept].float(), tau[n][kept] * 4.0), n
        assert torch.equal(v[~kept], torch.zeros_like(v[~kept])), n
        kept_total += int(kept.sum())
        total += v.numel()
        masks.append(kept.reshape(-1)[:64])
    assert abs(kept_total - 0.25 * total) <= 5 * math.sqrt(total * 0.25 * 0.75)
    assert len({tuple(m.tolist()) for m in masks}) == len(masks), "each tensor draws its own mask"


def test_dare_ties_is_consensus_of_the_dropped_vectors(zoo, tmp_path):
    """dare_ties = TIES consensus over DARE-dropped vectors. The dropped vectors are recovered with
    dare_linear and a one-hot weight (same seed, same task index), then merged by the reference."""
    from surgery.lazy import TaskVector
    from surgery.recipes.merge import merged_vector

    tvs = [TaskVector.between(zoo[f"llama/{f}"], zoo["llama/base"]) for f in ("ft1", "ft2")]
    rec = []
    for i, w in enumerate(([1.0, 0.0], [0.0, 1.0])):
        m, _ = merged_vector("dare_linear", tvs, w, 0.5, seed=21, device="cpu")
        rec.append(read_tensors(m.save(tmp_path / f"rec{i}")))
    m, _ = merged_vector("dare_ties", tvs, [1.0, 0.5], 0.5, seed=21, device="cpu")
    got = read_tensors(m.save(tmp_path / "dt"))
    for n, v in got.items():
        want = ties_merge([rec[0][n], rec[1][n]], [1.0, 0.5])
        assert_float32_bound(v, want, rec[0][n].double().abs() + rec[1][n].double().abs(), n)
    assert any(not torch.equal(rec[0][n] != 0, rec[1][n] != 0) for n in got), "tasks draw different masks"


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_same_seed_same_bytes(zoo, cli, tmp_path, method):
    fts = [zoo["llama/ft1"], zoo["llama/ft2"]]
    args = ["--base", zoo["llama/base"], "--method", method, "--density", 0.3]
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        cli("merge", *fts, *args, "--seed", seed, "-o", tmp_path / name)

    def weights(folder):
        return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}

    a, b, c = (weights(tmp_path / x) for x in "abc")
    assert a and a == b, "the same seed gives the same bytes"
    assert a != c, "another seed gives another merge"


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("extra", [
    ["--method", "slerp"],
    ["--method", "ties", "--density", 0],
    ["--method", "ties", "--density", 1.5],
    ["--method", "dare_linear", "--density", -0.1],
    ["--weights", "1,2,3"],
    ["--method", "ties", "--scope", "layer"],
    ["--dry-run"],
])
def test_merge_refusals_leave_no_output(zoo, cli, tmp_path, extra):
    out = tmp_path / "out"
    cli("merge", zoo["llama/ft1"], zoo["llama/ft2"], "--base", zoo["llama/base"], *extra, "-o", out, ok=False)
    assert_no_output(out)


def test_merge_of_mismatched_models_names_every_tensor(zoo, cli, tmp_path):
    out = tmp_path / "out"
    r = cli("merge", zoo["llama/ft1"], zoo["llama/target-narrow"], "--base", zoo["llama/base"], "-o", out, ok=False)
    for i in range(2):
        for p in ("gate", "up", "down"):
            assert f"model.layers.{i}.mlp.{p}_proj.weight" in r.output
    assert_no_output(out)
