"""Spectral analysis: intruder dimensions, spectra, effective rank, subspace energy, the base-SVD cache,
the randomized top-k SVD, the report, mitigation and the CLI.

Every expected value is computed here from the weights with plain numpy (float64 full SVDs), the way
the paper's reference code states the test: fine-tuned left singular vector j < k is an intruder iff
max_i |cos(U0[:, i], Ut[:, j])| < epsilon, i over all of the base's thin-SVD left vectors.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _support import read_folder, write_st

from surgery.errors import IncompatibleInputsError, OutputError, PlanError
from surgery.spectral import analyze, reduce_intruders, spectral_report, write_report
from surgery.spectral import svd as spectral_svd

SIM_TOL = 1e-4  # float32 SVDs against float64 references, on well-conditioned test matrices


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread():
    """numpy's SVDs on one OpenBLAS thread: on a busy 2-core machine its spinning threads made one
    1536x384 SVD take 8 s instead of 0.08 s (torch is already on one thread, see conftest)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # comes with scikit-learn (via the MiniLM package); without it, no limit
        yield
        return
    with threadpool_limits(1):
        yield


# -- references ---------------------------------------------------------------------------------

def ref_similarity(w0: np.ndarray, wt: np.ndarray, k: int):
    u0 = np.linalg.svd(w0.astype(np.float64), full_matrices=False)[0]
    ut = np.linalg.svd(wt.astype(np.float64), full_matrices=False)[0]
    k = min(k, ut.shape[1])
    sims = np.zeros(k)
    for j in range(k):
        sims[j] = max(abs(float(u0[:, i] @ ut[:, j])) for i in range(u0.shape[1]))
    return sims


def ref_effective_rank(delta: np.ndarray) -> float:
    s = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
    s = s[s > 0]
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def ref_energy(w0: np.ndarray, delta: np.ndarray, k: int) -> tuple[float, float, float]:
    u0, _, vh0 = np.linalg.svd(w0.astype(np.float64), full_matrices=False)
    d = delta.astype(np.float64)
    total = (d ** 2).sum()
    if total == 0:
        return None, None, None
    left = ((u0[:, :k].T @ d) ** 2).sum() / total
    right = ((d @ vh0[:k].T) ** 2).sum() / total
    both = ((u0[:, :k].T @ d @ vh0[:k].T) ** 2).sum() / total
    return left, right, both


def ref_mitigated(w0: np.ndarray, wt: np.ndarray, k: int, epsilon: float, lam: float) -> np.ndarray:
    """PEFT's reduce_intruder_dimension on W_ft, in float64."""
    u, s, vh = np.linalg.svd(wt.astype(np.float64), full_matrices=False)
    sims = ref_similarity(w0, wt, k)
    out = wt.astype(np.float64).copy()
    for j in np.nonzero(sims < epsilon)[0]:
        out += (lam - 1.0) * s[j] * np.outer(u[:, j], vh[j])
    return out


# -- synthetic checkpoints ----------------------------------------------------------------------

def gapped(m: int, n: int, seed: int, top: float = 10.0, decay: float = 0.85) -> np.ndarray:
    """A matrix with a well-separated, geometrically decaying spectrum (unambiguous singular vectors)."""
    rng = np.random.default_rng(seed)
    r = min(m, n)
    u = np.linalg.qr(rng.standard_normal((m, r)))[0]
    v = np.linalg.qr(rng.standard_normal((n, r)))[0]
    s = top * decay ** np.arange(r)
    return (u * s) @ v.T


def unit(n: int, rng) -> np.ndarray:
    x = rng.standard_normal(n)
    return x / np.linalg.norm(x)


def save(folder: Path, mats: dict[str, np.ndarray], extra: dict | None = None) -> Path:
    tensors = {n: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for n, a in mats.items()}
    tensors.update(extra or {})
    write_st(Path(folder) / "model.safetensors", tensors)
    return Path(folder)


NAMES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
         "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A base of four gapped matrices (two shapes, two layers) plus an embedding and a norm (not
    analysed by default); fine-tunes: a rank-1 intruder in layer 1's q_proj, and a small dense noise."""
    root = tmp_path_factory.mktemp("spectral-synth")
    shapes = {NAMES[0]: (48, 48), NAMES[1]: (96, 48), NAMES[2]: (48, 48), NAMES[3]: (96, 48)}
    base = {n: gapped(*s, seed=i) for i, (n, s) in enumerate(shapes.items())}
    extra = {"model.embed_tokens.weight": torch.randn(40, 48, generator=torch.Generator().manual_seed(0)),
             "model.norm.weight": torch.ones(48)}
    rng = np.random.default_rng(99)
    spike = dict(base)
    w = base[NAMES[2]]
    sigma = 2.0 * np.linalg.norm(w, 2)  # larger than the top singular value: it becomes the top direction
    spike[NAMES[2]] = w + sigma * np.outer(unit(48, rng), unit(48, rng))
    noise = {n: a + 1e-3 * rng.standard_normal(a.shape) for n, a in base.items()}
    mats = {"base": base, "spike": spike, "noise": noise}
    return type("Synth", (), {
        "base": save(root / "base", base, extra), "spike": save(root / "spike", spike, extra),
        "noise": save(root / "noise", noise, extra), "root": root,
        "mats": {k: {n: a.astype(np.float32) for n, a in v.items()} for k, v in mats.items()}})


# -- the metrics ---------------------------------------------------------------------------------

def test_rank1_update_larger_than_top_singular_value_is_exactly_one_intruder(synthetic, tmp_path):
    result = analyze(synthetic.base, [synthetic.spike], cache_dir=False)
    ft = result.fine_tunes[0]
    assert sorted(m.name for m in ft.matrices) == sorted(NAMES)  # blocks only: no embedding, no norm
    counts = {m.name: m.intruders["0.5"] for m in ft.matrices}
    assert counts == {NAMES[0]: 0, NAMES[1]: 0, NAMES[2]: 1, NAMES[3]: 0}
    assert result.matrix(NAMES[2]).intruder_indices == [0]  # the new, largest direction
    assert ft.total(0.5) == 1


def test_small_full_rank_perturbation_has_no_intruders(synthetic):
    result = analyze(synthetic.base, [synthetic.noise], cache_dir=False)
    assert result.fine_tunes[0].total(0.5) == 0
    assert all(min(m.similarity) > 0.9 for m in result.fine_tunes[0].matrices)


@pytest.mark.parametrize("ft_svd", ["full", "randomized"])
def test_every_figure_equals_brute_force(synthetic, ft_svd):
    k = 10
    result = analyze(synthetic.base, [synthetic.spike, synthetic.noise], k=k, cache_dir=False, ft_svd=ft_svd)
    assert result.epsilons == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    for ft_name, ft in zip(("spike", "noise"), result.fine_tunes):
        for m in ft.matrices:
            w0, wt = synthetic.mats["base"][m.name], synthetic.mats[ft_name][m.name]
            sims = ref_similarity(w0, wt, k)
            np.testing.assert_allclose(m.similarity, sims, atol=SIM_TOL, err_msg=m.name)
            for e in result.epsilons:
                assert min(abs(sims - e)) > 10 * SIM_TOL, "test data too close to a threshold"
                assert m.intruders[f"{e:g}"] == int((sims < e).sum()), (m.name, e)
            s0 = np.linalg.svd(w0.astype(np.float64), compute_uv=False)
            st = np.linalg.svd(wt.astype(np.float64), compute_uv=False)
            delta = wt.astype(np.float64) - w0.astype(np.float64)
            sd = np.linalg.svd(delta, compute_uv=False)
            np.testing.assert_allclose(m.base_singular_values, s0[:k], rtol=1e-5)
            np.testing.assert_allclose(m.ft_singular_values, st[:k], rtol=1e-5)
            # the Gram route resolves singular values down to sqrt(r * eps64) of the largest; below, zero
            floor = np.sqrt(min(w0.shape) * np.finfo(np.float64).eps) * sd[0]
            np.testing.assert_allclose(m.update_singular_values, sd[:k], rtol=1e-6, atol=2 * floor)
            # (the unresolved tail, here float32 rounding of the stored weights, moves it by ~1e-5)
            assert m.update_effective_rank == pytest.approx(ref_effective_rank(delta), rel=1e-4)
            left, right, both = ref_energy(w0, delta, k)
            for key, want in (("left", left), ("right", right), ("both", both)):
                got = m.energy_in_base_topk[key]
                assert got is None if want is None else got == pytest.approx(want, abs=1e-6), (m.name, key)
            assert m.update_frobenius_sq == pytest.approx((delta ** 2).sum(), rel=1e-9)
            assert m.ft_svd["method"] == ft_svd
    # per layer: the sums of the per-matrix counts
    layers = result.fine_tunes[0].layers(result.epsilons)
    assert [(r["layer"], r["intruders"]["0.5"], r["matrices"]) for r in layers] == [(0, 0, 2), (1, 1, 2)]
    if ft_svd == "randomized":  # big enough for subspace iteration to pay: auto picks it too
        assert spectral_svd.randomized_pays((48, 48), 10) is False


def test_effective_rank_of_a_rank_r_update_and_of_no_update(synthetic, tmp_path):
    rng = np.random.default_rng(5)
    mats = dict(synthetic.mats["base"])
    w = mats[NAMES[1]]
    # rank 3 with equal singular values: effective rank exactly 3
    u = np.linalg.qr(rng.standard_normal((96, 3)))[0]
    v = np.linalg.qr(rng.standard_normal((48, 3)))[0]
    mats[NAMES[1]] = w + 0.5 * u @ v.T
    ft = save(tmp_path / "rank3", mats)
    result = analyze(synthetic.base, [ft], cache_dir=False)
    assert result.matrix(NAMES[1]).update_effective_rank == pytest.approx(3.0, rel=1e-4)
    unchanged = result.matrix(NAMES[0])
    assert unchanged.update_effective_rank == 0.0 and unchanged.energy_in_base_topk["left"] is None
    assert unchanged.similarity == pytest.approx([1.0] * 10, abs=1e-5)


# -- the base-SVD cache ---------------------------------------------------------------------------

def test_cache_is_reused_and_invalidated_when_the_base_changes(synthetic, tmp_path):
    cache = tmp_path / "cache"
    spectral_svd.reset_counts()
    first = analyze(synthetic.base, [synthetic.spike], cache_dir=cache)
    assert spectral_svd.counts()["base_svd"] == 4 and first.cache["misses"] == 4
    spectral_svd.reset_counts()
    second = analyze(synthetic.base, [synthetic.noise], cache_dir=cache)
    assert spectral_svd.counts().get("base_svd", 0) == 0  # no base SVD at all
    assert second.cache["hits"] == 4 and {m.base_svd for m in second.fine_tunes[0].matrices} == {"cache"}
    again = analyze(synthetic.base, [synthetic.spike], cache_dir=cache)
    assert [m.similarity for m in again.fine_tunes[0].matrices] == [m.similarity for m in first.fine_tunes[0].matrices]
    # another base: one matrix differs by one entry -> exactly that matrix is decomposed again
    changed = dict(synthetic.mats["base"])
    changed[NAMES[3]] = changed[NAMES[3]].copy()
    changed[NAMES[3]][0, 0] += 0.25
    other = save(tmp_path / "base2", changed)
    spectral_svd.reset_counts()
    third = analyze(other, [synthetic.spike], cache_dir=cache)
    assert spectral_svd.counts()["base_svd"] == 1
    assert {m.name: m.base_svd for m in third.fine_tunes[0].matrices} == {
        NAMES[0]: "cache", NAMES[1]: "cache", NAMES[2]: "cache", NAMES[3]: "computed"}
    assert third.base_matrices_sha256 != first.base_matrices_sha256
    np.testing.assert_allclose(third.matrix(NAMES[3]).base_singular_values,
                               np.linalg.svd(changed[NAMES[3]].astype(np.float64), compute_uv=False)[:10], rtol=1e-5)


def test_one_base_svd_per_matrix_for_many_fine_tunes_without_a_disk_cache(synthetic):
    spectral_svd.reset_counts()
    result = analyze(synthetic.base, [synthetic.spike, synthetic.noise, synthetic.spike], cache_dir=False)
    assert spectral_svd.counts()["base_svd"] == 4
    assert result.fine_tunes[0].total(0.5) == result.fine_tunes[2].total(0.5) == 1


# -- the randomized top-k SVD ----------------------------------------------------------------------

def test_randomized_topk_matches_the_full_svd_within_its_stated_tolerance():
    """On real MiniLM matrices (flat, realistic spectra), perturbed: the randomized top-k agrees with
    numpy's float64 SVD: singular values to 1e-5 relative, each similarity to the stated bound."""
    from safetensors import safe_open

    from _support import minilm_dir

    names = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.intermediate.dense.weight",
             "encoder.layer.0.output.dense.weight"]
    with safe_open(str(minilm_dir() / "model.safetensors"), "pt") as f:
        mats = [f.get_tensor(n) for n in names]
    g = torch.Generator().manual_seed(3)
    for w0 in mats:
        wt = w0 + 2e-3 * torch.randn(w0.shape, generator=g)
        v0 = torch.linalg.svd(w0, full_matrices=False)[2]
        top = spectral_svd.topk_svd(wt[None], 10, "randomized", warm=v0[None, :64], seed="t")
        assert top.method == ["randomized"] and top.error_bound[0] <= spectral_svd.DEFAULT_TOL
        u, s, vh = np.linalg.svd(wt.double().numpy(), full_matrices=False)
        np.testing.assert_allclose(top.s[0].numpy(), s[:10], rtol=1e-5)
        u0 = np.linalg.svd(w0.double().numpy(), full_matrices=False)[0]
        ours = np.abs(top.u[0].double().numpy().T @ u0).max(axis=1)
        exact = np.abs(u[:, :10].T @ u0).max(axis=1)
        assert np.abs(ours - exact).max() <= spectral_svd.DEFAULT_TOL
        # and the vectors themselves: |cos| to the exact ones within the bound (sine <= tol)
        cos = np.abs((top.u[0].double().numpy() * u[:, :10]).sum(axis=0))
        assert (np.sqrt(np.clip(1 - cos ** 2, 0, None)) <= spectral_svd.DEFAULT_TOL).all()


def test_randomized_falls_back_to_the_full_svd_when_its_bound_is_not_met():
    # equal top singular values: no gap, so no bound can certify the vectors
    rng = np.random.default_rng(1)
    u = np.linalg.qr(rng.standard_normal((200, 200)))[0]
    v = np.linalg.qr(rng.standard_normal((200, 200)))[0]
    s = np.ones(200)
    a = torch.from_numpy(((u * s) @ v.T).astype(np.float32))[None]
    top = spectral_svd.topk_svd(a, 10, "randomized", seed="x")
    assert top.method[0].startswith("full (randomized bound") and top.error_bound == [None]
    np.testing.assert_allclose(top.s[0].numpy(), 1.0, rtol=1e-5)


# -- other kinds of fine-tune ---------------------------------------------------------------------

class RankOneAdapter:
    """What a LoRA adapter offers the analysis: the fine-tuned matrix, base + B @ A, per name."""

    label = "rank-1 adapter"

    def __init__(self, name: str, b: np.ndarray, a: np.ndarray):
        self.name, self.b, self.a = name, torch.from_numpy(b.astype(np.float32)), torch.from_numpy(a.astype(np.float32))

    def finetuned_matrix(self, name, base):
        return base + self.b @ self.a if name == self.name else base


def test_task_vectors_and_adapter_objects_are_fine_tunes(synthetic):
    from surgery.lazy import TaskVector

    direct = analyze(synthetic.base, [synthetic.spike], cache_dir=False)
    tv = TaskVector.between(synthetic.spike, synthetic.base)
    lazy = analyze(synthetic.base, [tv], cache_dir=False)
    for a, b in zip(direct.fine_tunes[0].matrices, lazy.fine_tunes[0].matrices):
        np.testing.assert_allclose(a.similarity, b.similarity, atol=1e-6)
        assert a.intruders == b.intruders
    spike = synthetic.mats["spike"][NAMES[2]].astype(np.float64) - synthetic.mats["base"][NAMES[2]]
    u, s, vh = np.linalg.svd(spike)
    adapter = RankOneAdapter(NAMES[2], (u[:, :1] * s[:1]), vh[:1])
    via = analyze(synthetic.base, [adapter], cache_dir=False)
    assert via.fine_tunes[0].label == "rank-1 adapter"
    assert {m.name: m.intruders["0.5"] for m in via.fine_tunes[0].matrices} == {
        NAMES[0]: 0, NAMES[1]: 0, NAMES[2]: 1, NAMES[3]: 0}


def test_include_selects_by_regex_and_bad_input_is_a_clear_error(synthetic, tmp_path):
    result = analyze(synthetic.base, [synthetic.spike], include=r"up_proj|embed_tokens", cache_dir=False)
    assert sorted(m.name for m in result.fine_tunes[0].matrices) == sorted([NAMES[1], "model.embed_tokens.weight", NAMES[3]])
    assert result.fine_tunes[0].layers(result.epsilons)[0]["layer"] is None  # the embedding: outside the blocks
    with pytest.raises(PlanError, match="not a valid regular expression"):
        analyze(synthetic.base, [synthetic.spike], include="(", cache_dir=False)
    with pytest.raises(PlanError, match="no 2-D float matrix"):
        analyze(synthetic.base, [synthetic.spike], include="nothing-matches", cache_dir=False)
    with pytest.raises(PlanError, match="k must be"):
        analyze(synthetic.base, [synthetic.spike], k=0, cache_dir=False)
    with pytest.raises(PlanError, match="unknown fine-tune SVD method 'exact'"):
        analyze(synthetic.base, [synthetic.spike], ft_svd="exact", cache_dir=False)
    with pytest.raises(PlanError, match=r"epsilons must lie in \(0, 1\]"):
        analyze(synthetic.base, [synthetic.spike], epsilons=(0.5, 1.5), cache_dir=False)
    with pytest.raises(PlanError, match="list of fine-tunes"):
        analyze(synthetic.base, str(synthetic.spike), cache_dir=False)
    wrong = dict(synthetic.mats["base"])
    wrong[NAMES[1]] = wrong[NAMES[1]][:, :40]
    del wrong[NAMES[0]]
    bad = save(tmp_path / "bad", wrong)
    with pytest.raises(IncompatibleInputsError) as e:
        analyze(synthetic.base, [bad], cache_dir=False)
    msg = str(e.value)
    assert "2 incompatibilities" in msg and NAMES[0] in msg and NAMES[1] in msg and "[96, 40]" in msg


# -- the report ----------------------------------------------------------------------------------

def test_report_files_exist_and_the_json_agrees_with_recomputation(synthetic, tmp_path):
    import csv

    result = analyze(synthetic.base, [synthetic.spike, synthetic.noise], cache_dir=False)
    out = write_report(result, tmp_path / "report")
    expected = {"spectral.json", "matrices.csv", "vectors.csv", "sweep.csv", "layers.csv", "heatmap.csv", "spectra.csv",
                "intruders_vs_epsilon.png", "intruders_per_layer.png", "similarity_heatmap.png", "spectra.png",
                "index.html"}
    assert {p.name for p in out.iterdir()} == expected
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    data = json.loads((out / "spectral.json").read_text())
    assert data["k"] == 10 and data["epsilon"] == 0.5 and data["settings"]["svd_dtype"] == "float32"
    assert data["heatmap"]["matrix"] == NAMES[2] and data["heatmap"]["ft"] == str(synthetic.spike)
    for ft_name, ft in zip(("spike", "noise"), data["fine_tunes"]):
        for m in ft["matrices"]:
            sims = ref_similarity(synthetic.mats["base"][m["name"]], synthetic.mats[ft_name][m["name"]], 10)
            np.testing.assert_allclose(m["similarity"], sims, atol=SIM_TOL)
            assert m["intruders"]["0.5"] == int((sims < 0.5).sum())
        assert ft["intruders"] == sum(m["intruders"]["0.5"] for m in ft["matrices"])
    # the heat map: |cos| of the chosen matrix's top-k fine-tuned vectors with the top base vectors
    w0, wt = synthetic.mats["base"][NAMES[2]].astype(np.float64), synthetic.mats["spike"][NAMES[2]].astype(np.float64)
    u0, ut = np.linalg.svd(w0)[0], np.linalg.svd(wt)[0]
    np.testing.assert_allclose(np.array(data["heatmap"]["values"]), np.abs(ut[:, :10].T @ u0)[:, :48], atol=SIM_TOL)
    sweep = list(csv.DictReader(open(out / "sweep.csv")))
    assert [(r["ft"], float(r["epsilon"]), int(r["intruders"])) for r in sweep] == \
        [(d["ft"], d["epsilon"], d["intruders"]) for d in data["sweep"]]
    vectors = list(csv.DictReader(open(out / "vectors.csv")))
    assert len(vectors) == 2 * 4 * 10 and sum(int(r["intruder"]) for r in vectors) == 1
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "src='http" not in page and 'src="http' not in page
    with pytest.raises(OutputError, match="already exists"):
        write_report(result, out)


# -- mitigation ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A real tiny Llama (save_pretrained) and a fine-tune of it: small noise everywhere plus a rank-1
    update larger than the top singular value on both layers' q_proj and layer 1's down_proj."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from _support import copy_tokenizer

    root = tmp_path_factory.mktemp("spectral-llama")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    copy_tokenizer(root / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(1e-4 * torch.randn(p.shape, generator=g))
            if name.endswith(("q_proj.weight", "layers.1.mlp.down_proj.weight")):
                u, v = torch.randn(p.shape[0], 1, generator=g), torch.randn(1, p.shape[1], generator=g)
                p.add_(2.0 * torch.linalg.matrix_norm(p, 2) * (u / u.norm()) @ (v / v.norm()))
    model.save_pretrained(root / "ft")
    copy_tokenizer(root / "ft")
    return root


@pytest.mark.parametrize("lam", [1.0, 0.0, 0.75])
def test_mitigation_against_a_reference(tiny_llama, tmp_path, lam):
    from transformers import LlamaForCausalLM

    out, result = reduce_intruders(tiny_llama / "base", tiny_llama / "ft", tmp_path / "mitigated",
                                   mitigation_lambda=lam, cache_dir=False)
    base, ft, got = read_folder(tiny_llama / "base"), read_folder(tiny_llama / "ft"), read_folder(out)
    assert set(got) == set(ft)
    corrected = json.loads((out / "surgery_recipe.json").read_text())["recipe"]["corrected"]
    if lam == 1.0:
        assert corrected == {}
        assert all(torch.equal(got[n], ft[n]) for n in ft)  # the identity, bit for bit
    else:
        assert set(corrected) == {"model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight",
                                  "model.layers.1.mlp.down_proj.weight"}
    for m in result.fine_tunes[0].matrices:
        w0, wt = base[m.name].double().numpy(), ft[m.name].double().numpy()
        sims = ref_similarity(w0, wt, 10)
        assert min(abs(sims - 0.5)) > 10 * SIM_TOL, "test data too close to the threshold"
        expected = ref_mitigated(w0, wt, 10, 0.5, lam)
        scale = np.abs(wt).max()
        assert np.abs(got[m.name].double().numpy() - expected).max() <= 1e-5 * scale, m.name
        if m.name not in corrected:
            assert torch.equal(got[m.name], ft[m.name])
    for n in ft:  # everything outside the analysed matrices is the fine-tune's
        if n not in {m.name for m in result.fine_tunes[0].matrices}:
            assert torch.equal(got[n], ft[n]), n
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    LlamaForCausalLM.from_pretrained(out)  # loads as is
    if lam == 0.0:  # the intruder directions are gone: analysed again, none is left
        again = analyze(tiny_llama / "base", [out], cache_dir=False)
        assert again.fine_tunes[0].total(0.5) == 0


# -- the CLI, end to end --------------------------------------------------------------------------

def test_cli_end_to_end_on_real_tiny_models(tiny_llama, tmp_path, cli):
    result = cli("spectral", "--base", tiny_llama / "base", "--ft", tiny_llama / "ft", "--ft", tiny_llama / "base",
                 "-o", tmp_path / "report", "--cache-dir", tmp_path / "cache", "--k", 8, "--epsilon", 0.4, "-q")
    lines = result.output.strip().splitlines()
    assert lines[0] == f"{tiny_llama / 'ft'}: 3 intruders at epsilon 0.4 in 14 matrices"
    assert lines[1] == f"{tiny_llama / 'base'}: 0 intruders at epsilon 0.4 in 14 matrices"
    data = json.loads((tmp_path / "report" / "spectral.json").read_text())
    assert data["k"] == 8 and 0.4 in data["epsilons"] and len(data["fine_tunes"]) == 2
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 14
    # the same run with mitigation: the base comes from the cache
    result = cli("spectral", "--base", tiny_llama / "base", "--ft", tiny_llama / "ft", "-o", tmp_path / "report2",
                 "--cache-dir", tmp_path / "cache", "--mitigate", 0.0, "--mitigated-out", tmp_path / "mitigated", "-q")
    assert f"wrote {tmp_path / 'report2'} and {tmp_path / 'mitigated'}" in result.output
    data = json.loads((tmp_path / "report2" / "spectral.json").read_text())
    assert data["cache"]["hits"] == 14 and data["cache"]["misses"] == 0
    again = analyze(tiny_llama / "base", [tmp_path / "mitigated"], cache_dir=tmp_path / "cache")
    assert again.fine_tunes[0].total(0.5) == 0
    # errors: one line, non-zero exit
    bad = cli("spectral", "--base", tiny_llama / "base", "--ft", tiny_llama / "ft", "-o", tmp_path / "r3",
              "--mitigate", 0.5, ok=False)
    assert "--mitigate LAMBDA and --mitigated-out DIR go together" in bad.output
    bad = cli("spectral", "--base", tiny_llama / "base", "--ft", tiny_llama / "ft", "-o", tmp_path / "report", ok=False)
    assert "already exists" in bad.output
    bad = cli("spectral", "--base", tiny_llama / "base", "--ft", tmp_path / "missing", "-o", tmp_path / "r4", ok=False)
    assert "no such file or folder" in bad.output and str(tmp_path / "missing") in bad.output


def test_a_peft_lora_adapter_is_analysed_as_its_merged_model(tiny_llama, tmp_path):
    """A LoRA adapter folder (read through surgery.lora) gives the same figures as the model peft
    merges from it, and untouched matrices show no change."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    base_model = LlamaForCausalLM.from_pretrained(tiny_llama / "base")
    torch.manual_seed(4)
    peft_model = get_peft_model(base_model, LoraConfig(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    with torch.no_grad():  # a large rank-1 update, so its direction shows
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(20.0)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    result = analyze(tiny_llama / "base", [tmp_path / "adapter", tmp_path / "merged"], cache_dir=False)
    adapter, merged = result.fine_tunes
    assert adapter.label == str(tmp_path / "adapter")
    for a, m in zip(adapter.matrices, merged.matrices):
        assert a.name == m.name
        # peft rounds W + B @ A to float32, the adapter path rounds base + delta once from float64: the
        # weights agree to an ulp, and the small-gap tail vectors of a random init react at the 1e-3 level
        np.testing.assert_allclose(a.similarity, m.similarity, atol=2e-3, err_msg=a.name)
        assert a.intruders == m.intruders
        if "q_proj" in a.name or "v_proj" in a.name:
            assert a.update_effective_rank == pytest.approx(1.0, abs=1e-3)
        else:
            assert a.update_frobenius_sq == 0.0
    # mitigating the adapter writes the merged model with its intruders scaled: as mitigating peft's merge
    _, _, from_adapter = spectral_report(tiny_llama / "base", [tmp_path / "adapter"], tmp_path / "r", mitigate=0.5,
                                         mitigated_out=tmp_path / "m", cache_dir=False)
    from_merged, _ = reduce_intruders(tiny_llama / "base", tmp_path / "merged", tmp_path / "m2",
                                      mitigation_lambda=0.5, cache_dir=False)
    a, b = read_folder(from_adapter), read_folder(from_merged)
    assert set(a) == set(b)
    assert json.loads((from_adapter / "surgery_recipe.json").read_text())["recipe"]["corrected"]
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-5 * float(b[n].abs().max()), msg=n)


def test_mitigation_prints_a_recipe_that_replays_and_chains(tiny_llama, tmp_path, cli, monkeypatch):
    """`spectral --mitigate --print-recipe` prints a reduce_intruders step: run, it writes the bytes
    the command wrote; chained into a soup, it equals the two commands in sequence."""
    import yaml
    from test_recipe_file import assert_same_bytes, write_recipe

    monkeypatch.setenv("SURGERY_CACHE_DIR", str(tmp_path / "cache"))
    args = ["spectral", "--base", tiny_llama / "base", "--ft", tiny_llama / "ft", "-o", tmp_path / "report",
            "--mitigate", 0.5, "--k", 8, "--epsilon", 0.4, "-q"]
    cli(*args, "--mitigated-out", tmp_path / "direct")
    r = cli(*args, "--mitigated-out", tmp_path / "replayed", "--print-recipe")
    assert not (tmp_path / "replayed").exists()
    step = yaml.safe_load(r.output)["steps"]["reduce_intruders"]
    assert step["lambda"] == 0.5 and step["k"] == 8 and step["epsilon"] == 0.4
    (tmp_path / "one.yaml").write_text(r.output)
    cli("run", tmp_path / "one.yaml")
    assert_same_bytes(tmp_path / "direct", tmp_path / "replayed")
    card = json.loads((tmp_path / "replayed" / "surgery_recipe.json").read_text())["recipe"]
    assert card["operation"] == "reduce_intruders" and sum(card["corrected"].values()) > 0

    cli("soup", tmp_path / "direct", tiny_llama / "base", "-o", tmp_path / "seq")
    recipe = {"inputs": {"base": str(tiny_llama / "base"), "ft": str(tiny_llama / "ft")},
              "steps": {"m": {"op": "reduce_intruders", "base": "base", "ft": "ft", "lambda": 0.5, "k": 8,
                              "epsilon": 0.4},
                        "s": {"op": "soup", "models": ["m", "base"]}},
              "output": {"step": "s", "path": str(tmp_path / "chained")}}
    cli("run", write_recipe(tmp_path / "r.yaml", recipe))
    assert_same_bytes(tmp_path / "seq", tmp_path / "chained")
    bad = cli("spectral", "--base", tiny_llama / "base", "--ft", tiny_llama / "ft", "-o", tmp_path / "r2",
              "--print-recipe", ok=False)
    assert "the report has no recipe form" in bad.output
