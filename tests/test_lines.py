"""LiNeS: ``base + lambda(l) * (ft - base)``, lambda(l) = alpha + beta * l / (L - 1) for residual block
l of L, alpha outside the blocks; on Llama, GPT-2 and BERT naming, and as ``merge --lines``."""
from __future__ import annotations

import json

import pytest
import torch

from tv_support import (AUTO, LAYER_RE, assert_float32_bound, assert_no_output, expected_lambda, load_state,
                        read_tensors, task_vector, ties_merge, topk_mask, write_checkpoint)

ALPHA, BETA = 0.3, 0.6
FAMILIES = {"llama12": ("llama", 12), "gpt2": ("gpt2", 3), "bert": ("bert", 3)}  # family: (naming, depth)
OUTSIDE = {  # tensors outside the residual blocks that every architecture has: they get alpha
    "llama12": ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"],
    "gpt2": ["transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias"],
    "bert": ["bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
             "bert.embeddings.LayerNorm.weight", "cls.predictions.bias", "cls.predictions.transform.dense.weight"],
}


def parse_lambdas(output: str) -> dict[str, float]:
    out = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2:
            out[parts[0]] = float(parts[1])
    return out


def check_lambdas(lambdas: dict, fam: str, alpha: float, beta: float, names, rel: float):
    naming, depth = FAMILIES[fam]
    assert set(lambdas) == set(names)
    for n in names:
        assert lambdas[n] == pytest.approx(expected_lambda(naming, n, depth, alpha, beta), rel=rel, abs=1e-12), n
    first = [n for n in names if LAYER_RE[naming].match(n) and int(LAYER_RE[naming].match(n).group(1)) == 0]
    last = [n for n in names if LAYER_RE[naming].match(n) and int(LAYER_RE[naming].match(n).group(1)) == depth - 1]
    assert first and last
    assert all(lambdas[n] == pytest.approx(alpha, rel=rel) for n in first), "lambda(0) = alpha"
    assert all(lambdas[n] == pytest.approx(alpha + beta, rel=rel) for n in last), "lambda(L-1) = alpha + beta"
    for n in OUTSIDE[fam]:
        assert lambdas[n] == pytest.approx(alpha, rel=rel), f"{n} is outside the blocks"
    assert len({round(v, 9) for v in lambdas.values()}) == depth, "one lambda per block (the first shared with alpha)"


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_dry_run_lambdas_cli(zoo, cli, tmp_path, fam):
    base, ft = zoo[f"{fam}/base"], zoo[f"{fam}/ft1"]
    before = sorted(tmp_path.iterdir())
    r = cli("lines", "--base", base, "--ft", ft, "--alpha", ALPHA, "--beta", BETA, "--dry-run")
    check_lambdas(parse_lambdas(r.output), fam, ALPHA, BETA, read_tensors(ft), rel=1e-5)
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_dry_run_lambdas_library(zoo, fam):
    import surgery

    lambdas = surgery.lines(zoo[f"{fam}/base"], zoo[f"{fam}/ft1"], None, alpha=0.25, beta=-0.5, dry_run=True)
    check_lambdas(lambdas, fam, 0.25, -0.5, read_tensors(zoo[f"{fam}/ft1"]), rel=1e-12)


def test_layer_one_never_matches_layer_ten(zoo):
    """12 blocks: every tensor of block 1 gets alpha + beta/11, of block 10 alpha + 10 beta/11."""
    import surgery

    lambdas = surgery.lines(zoo["llama12/base"], zoo["llama12/ft1"], None, alpha=0.0, beta=1.0, dry_run=True)
    one = [n for n in lambdas if n.startswith("model.layers.1.")]
    ten = [n for n in lambdas if n.startswith("model.layers.10.")]
    assert len(one) == len(ten) == 9
    assert all(lambdas[n] == pytest.approx(1 / 11) for n in one)
    assert all(lambdas[n] == pytest.approx(10 / 11) for n in ten)
    assert lambdas["model.layers.11.mlp.down_proj.weight"] == pytest.approx(1.0)


def test_block_functions_on_handmade_names():
    from surgery.errors import PlanError
    from surgery.layers import block_index, blocks, lines_lambda

    names = ["model.layers.10.mlp.experts.1.w1.weight", "model.layers.1.mlp.experts.10.w1.weight",
             "model.layers.0.input_layernorm.weight", "model.layers.11.mlp.gate.weight", "model.layers.1",
             "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.mylayers.3.x.weight",
             "model.layers.1x.weight"]
    found = blocks(names, {"num_hidden_layers": 12})
    got = {n: (b.index, b.depth) for n, b in found.items()}
    assert got == {"model.layers.10.mlp.experts.1.w1.weight": (10, 12),
                   "model.layers.1.mlp.experts.10.w1.weight": (1, 12),
                   "model.layers.0.input_layernorm.weight": (0, 12),
                   "model.layers.11.mlp.gate.weight": (11, 12),
                   "model.layers.1": (1, 12)}
    assert block_index("transformer.h.2.attn.c_attn.weight") == ("transformer.h", 2)
    assert block_index("bert.encoder.layer.7.output.dense.weight") == ("bert.encoder.layer", 7)
    assert block_index("model.layers.10.mlp.experts.1.w1.weight") == ("model.layers", 10)
    lam = {n: lines_lambda(found.get(n), 0.5, 1.1) for n in names}
    assert lam["model.layers.10.mlp.experts.1.w1.weight"] == pytest.approx(0.5 + 1.1 * 10 / 11)
    assert lam["model.layers.1.mlp.experts.10.w1.weight"] == pytest.approx(0.5 + 1.1 / 11)
    assert lam["model.layers.11.mlp.gate.weight"] == pytest.approx(1.6)
    assert lam["model.embed_tokens.weight"] == lam["model.mylayers.3.x.weight"] == 0.5
    # depth from the names when the config has none
    assert blocks(["a.layers.0.w", "a.layers.4.w"], None)["a.layers.4.w"].depth == 5
    with pytest.raises(PlanError):  # the names contradict the config
        blocks(["model.layers.12.w"], {"num_hidden_layers": 12})


def test_lines_on_handmade_moe_checkpoint(tmp_path):
    """Expert names inside block 10 of 11: the expert index never counts as a block."""
    import surgery

    names = ["model.layers.10.mlp.experts.1.w1.weight", "model.layers.1.mlp.experts.10.w1.weight",
             "model.layers.0.mlp.experts.0.w1.weight", "model.embed_tokens.weight"]
    config = {"model_type": "handmade", "num_hidden_layers": 11, "tie_word_embeddings": False}
    g = torch.Generator().manual_seed(3)
    base = {n: torch.randn(3, 4, generator=g) for n in names}
    ft = {n: v + torch.randn(3, 4, generator=g) for n, v in base.items()}
    bdir, fdir = write_checkpoint(tmp_path / "b", base, config), write_checkpoint(tmp_path / "f", ft, config)
    lambdas = surgery.lines(bdir, fdir, None, alpha=0.2, beta=1.0, dry_run=True)
    assert lambdas == pytest.approx({names[0]: 1.2, names[1]: 0.3, names[2]: 0.2, names[3]: 0.2})
    out = read_tensors(surgery.lines(bdir, fdir, tmp_path / "o", alpha=0.2, beta=1.0))
    for n, lam in zip(names, (1.2, 0.3, 0.2, 0.2)):
        d = ft[n].double() - base[n].double()
        assert_float32_bound(out[n], base[n].double() + lam * d, base[n].double().abs() + lam * d.abs(), n)


# ---------------------------------------------------------------------------------------------
# Written outputs


def lines_reference(zoo, fam, alpha, beta):
    naming, depth = FAMILIES[fam]
    b, f = read_tensors(zoo[f"{fam}/base"]), read_tensors(zoo[f"{fam}/ft1"])
    out = {}
    for n in b:
        lam = expected_lambda(naming, n, depth, alpha, beta)
        d = f[n].double() - b[n].double()
        out[n] = (b[n].double() + lam * d, b[n].double().abs() + abs(lam) * d.abs())
    return out


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_written_lines_output(zoo, cli, tmp_path, fam):
    out = tmp_path / "out"
    cli("lines", "--base", zoo[f"{fam}/base"], "--ft", zoo[f"{fam}/ft1"], "--alpha", ALPHA, "--beta", BETA, "-o", out)
    got = read_tensors(out)
    want = lines_reference(zoo, fam, ALPHA, BETA)
    assert set(got) == set(want)
    for n, (ref, size) in want.items():
        assert got[n].dtype == torch.float32
        assert_float32_bound(got[n], ref, size, n)
    # a model transformers loads like the base
    _, info, _ = load_state(out, AUTO[FAMILIES[fam][0]], cache=False)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"]
    assert json.loads((out / "config.json").read_text()) == json.loads((zoo[f"{fam}/base"] / "config.json").read_text())


def test_written_lines_library_bf16(zoo, tmp_path):
    import surgery

    out = surgery.lines(zoo["llama12/base"], zoo["llama12/ft1"], tmp_path / "o", alpha=0.1, beta=0.9, dtype="bf16")
    got = read_tensors(out)
    for n, (ref, size) in lines_reference(zoo, "llama12", 0.1, 0.9).items():
        assert got[n].dtype == torch.bfloat16
        assert_float32_bound(got[n], ref, size, n)


@pytest.mark.parametrize("fam", ["llama12", "gpt2"])
def test_beta_zero_is_uniform_task_arithmetic(zoo, cli, tmp_path, fam):
    base, ft = zoo[f"{fam}/base"], zoo[f"{fam}/ft1"]
    r = cli("lines", "--base", base, "--ft", ft, "--alpha", 0.6, "--beta", 0, "--dry-run")
    assert set(parse_lambdas(r.output).values()) == {0.6}
    cli("lines", "--base", base, "--ft", ft, "--alpha", 0.6, "--beta", 0, "-o", tmp_path / "lines")
    cli("merge", ft, "--base", base, "--method", "task_arithmetic", "--lambda", 0.6, "-o", tmp_path / "ta")
    a, b = read_tensors(tmp_path / "lines"), read_tensors(tmp_path / "ta")
    assert set(a) == set(b)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    for n, (ref, size) in lines_reference(zoo, fam, 0.6, 0.0).items():
        assert_float32_bound(a[n], ref, size, n)


def test_lines_refusals(zoo, cli, tmp_path):
    cli("lines", "--base", zoo["llama12/base"], "--ft", zoo["llama12/ft1"], "--alpha", 1, "--beta", 0, ok=False)
    out = tmp_path / "o"
    r = cli("lines", "--base", zoo["llama/base"], "--ft", zoo["llama/target-narrow"], "--alpha", 1, "--beta", 0,
            "-o", out, ok=False)
    assert "model.layers.1.mlp.down_proj.weight" in r.output
    assert_no_output(out)


# ---------------------------------------------------------------------------------------------
# merge --lines: the multi-task alpha


def _taus(zoo, fts):
    b = read_tensors(zoo["llama/base"])
    return b, [{n: task_vector(read_tensors(zoo[f"llama/{f}"])[n], b[n]) for n in b} for f in fts]


def _l1(tensors: dict) -> float:
    return sum(float(v.double().abs().sum()) for v in tensors.values())


def test_multitask_alpha_task_arithmetic_is_one_over_t(zoo, cli, tmp_path):
    fts = [zoo["llama/ft1"], zoo["llama/ft2"]]
    r = cli("merge", *fts, "--base", zoo["llama/base"], "--lines", "--dry-run", "-o", tmp_path / "o")
    assert_no_output(tmp_path / "o")
    lambdas = parse_lambdas(r.output)
    assert set(lambdas) == set(read_tensors(zoo["llama/base"]))
    assert all(v == pytest.approx(0.5, rel=1e-6) for v in lambdas.values())
    import surgery

    lambdas = surgery.merge(zoo["llama/base"], fts + [zoo["llama/ft3"]], None, lines=True, beta=0.3, dry_run=True)
    for n, v in lambdas.items():
        assert v == pytest.approx(expected_lambda("llama", n, 2, 1 / 3, 0.3), rel=1e-9), n


def test_multitask_alpha_weighted_task_arithmetic(zoo):
    """With weights the merged vector is sum w_t tau_t, and alpha = (||sum tau||_1 / ||sum w tau||_1) / T."""
    import surgery

    b, taus = _taus(zoo, ["ft1", "ft2"])
    w = [1.0, 0.25]
    summed = {n: taus[0][n].double() + taus[1][n].double() for n in b}
    merged = {n: w[0] * taus[0][n].double() + w[1] * taus[1][n].double() for n in b}
    alpha = _l1(summed) / _l1(merged) / 2
    assert alpha > 0.55  # far from 1/T: the weights matter
    lambdas = surgery.merge(zoo["llama/base"], [zoo["llama/ft1"], zoo["llama/ft2"]], None, weights=w, lines=True,
                            dry_run=True)
    assert all(v == pytest.approx(alpha, rel=1e-6) for v in lambdas.values())


def test_multitask_alpha_ties(zoo, cli, tmp_path):
    b, taus = _taus(zoo, ["ft1", "ft2", "ft3"])
    summed = {n: sum(t[n].double() for t in taus) for n in b}
    merged = {n: ties_merge([torch.where(topk_mask(t[n], 0.5), t[n], torch.zeros_like(t[n])) for t in taus],
                            [1.0] * 3) for n in b}
    alpha = _l1(summed) / _l1(merged) / 3
    r = cli("merge", *(zoo[f"llama/{f}"] for f in ("ft1", "ft2", "ft3")), "--base", zoo["llama/base"],
            "--method", "ties", "--density", 0.5, "--lines", "--beta", 0.4, "--dry-run", "-o", tmp_path / "o")
    assert_no_output(tmp_path / "o")
    lambdas = parse_lambdas(r.output)
    assert set(lambdas) == set(b)
    for n, v in lambdas.items():
        assert v == pytest.approx(expected_lambda("llama", n, 2, alpha, 0.4), rel=1e-5), n


def test_merge_lines_written_output(zoo, cli, tmp_path):
    """base + lambda * lambda(l) * (tau_1 + tau_2), with explicit alpha and beta."""
    b, taus = _taus(zoo, ["ft1", "ft2"])
    out = tmp_path / "o"
    cli("merge", zoo["llama/ft1"], zoo["llama/ft2"], "--base", zoo["llama/base"], "--lines", "--alpha", 0.4,
        "--beta", 0.5, "--lambda", 0.8, "-o", out)
    got = read_tensors(out)
    assert set(got) == set(b)
    for n in b:
        lam = 0.8 * expected_lambda("llama", n, 2, 0.4, 0.5)
        m = taus[0][n].double() + taus[1][n].double()
        size = b[n].double().abs() + lam * (taus[0][n].abs() + taus[1][n].abs()).double()
        assert_float32_bound(got[n], b[n].double() + lam * m, size, n)
