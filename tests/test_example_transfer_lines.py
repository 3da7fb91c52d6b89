"""examples/transfer_lines.py in its fast mode, checked against values this test computes itself:
the written weights from the saved checkpoints (float64 reference), the reported accuracies from the
saved models on regenerated splits, the verdicts from the reported numbers."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _support import assert_close_ulp, minilm_dir, read_folder

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "transfer_lines.py"
BLOCK = re.compile(r"(?:^|\.)layer\.(\d+)\.")


def _import_example():
    spec = importlib.util.spec_from_file_location("transfer_lines_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """Run ``python examples/transfer_lines.py --fast`` in a subprocess (its own thread settings and
    environment, nothing leaking into this session); return the module, its results, its output."""
    work = tmp_path_factory.mktemp("transfer_lines")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(EXAMPLE), "--fast", "--workdir", str(work)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((work / "transfer_lines-fast" / "results.json").read_text())
    return _import_example(), results, proc.stdout


def _f64(state):
    return {k: v.double() for k, v in state.items()}


def test_pretrained_base_is_the_shipped_minilm(example):
    _, res, _ = example
    a = read_folder(Path(res["folders"]["A"]))
    shipped = read_folder(minilm_dir())
    for name, t in shipped.items():
        if name.endswith("position_ids"):
            continue
        assert torch.equal(a["bert." + name], t), name


@pytest.mark.parametrize("target", ["B", "C", "P"])
def test_transfer_is_target_plus_task_vector(example, target):
    _, res, _ = example
    f = res["folders"]
    base, ft, to = (_f64(read_folder(Path(f[k]))) for k in ("A", "A_ft", target))
    out = read_folder(Path(f[target + "+delta"]))
    assert set(out) == set(to)
    for name, t in out.items():
        assert_close_ulp(t, (to[name] + (ft[name] - base[name])).float(), 1, name)
    # the task vector was not empty: the head moved by A_ft - A
    assert not torch.equal(out["classifier.weight"], to["classifier.weight"].float())


def test_permuted_base_is_a_relabelled_minilm(example):
    """P before training holds A's numbers rearranged, and computes A's function."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    mod, res, _ = example
    f = res["folders"]
    a, p = read_folder(Path(f["A"])), read_folder(Path(f["P-init"]))
    assert set(a) == set(p)
    moved = [k for k in a if not torch.equal(a[k], p[k])]
    for k in a:
        assert torch.equal(a[k].flatten().sort().values, p[k].flatten().sort().values), k
    assert len(moved) >= len(a) - 3  # all but the head and the pooler's bias
    texts = [r[0] for r in mod.make_splits(fast=True)["test"][:8]]
    tok = AutoTokenizer.from_pretrained(f["A"])
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        la = AutoModelForSequenceClassification.from_pretrained(f["A"]).eval()(**enc).logits
        lp = AutoModelForSequenceClassification.from_pretrained(f["P-init"]).eval()(**enc).logits
    assert torch.allclose(la, lp, atol=1e-4), (la - lp).abs().max()
    assert res["p_same_function_max_logit_diff"] < 1e-4


def test_lines_is_base_plus_layer_scaled_task_vector(example):
    _, res, _ = example
    f = res["folders"]
    depth = json.loads((Path(f["A"]) / "config.json").read_text())["num_hidden_layers"]
    base, ft = _f64(read_folder(Path(f["A"]))), _f64(read_folder(Path(f["A_ft"])))
    for alpha in res["alphas"]:
        beta = 1.0 - alpha
        out = read_folder(Path(f[f"lines-a{alpha:g}"]))
        assert set(out) == set(base)
        for name, t in out.items():
            m = BLOCK.search(name)
            lam = alpha if m is None else alpha + beta * int(m.group(1)) / (depth - 1)
            assert_close_ulp(t, (base[name] + lam * (ft[name] - base[name])).float(), 1, f"alpha={alpha} {name}")
            if m is not None and int(m.group(1)) == depth - 1:  # the last block keeps its whole update
                assert_close_ulp(t, ft[name].float(), 1, name)


def _predict_one_by_one(folder: Path, texts: list[str]):
    """Labels and mean-pooled normalised last hidden states, one unpadded sentence at a time."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tok = AutoTokenizer.from_pretrained(folder)
    model.eval()
    labels, embs = [], []
    with torch.no_grad():
        for text in texts:
            out = model(**tok(text, return_tensors="pt"), output_hidden_states=True)
            labels.append(int(out.logits.argmax(-1)))
            embs.append(torch.nn.functional.normalize(out.hidden_states[-1][0].mean(0), dim=0))
    return torch.tensor(labels), torch.stack(embs)


def test_reported_accuracies_match_saved_models(example):
    mod, res, _ = example
    data = mod.make_splits(fast=True)
    assert mod.make_splits(fast=True) == data  # regenerated exactly
    texts = [r[0] for r in data["test"]]
    sentiment = torch.tensor([r[1] for r in data["test"]])
    reported = {r["name"]: r["test"] for r in res["claim1"]}
    for name in ("A_ft", "B + (A_ft - A)", "C + (A_ft - A)", "P + (A_ft - A)"):
        folder = Path(next(r["folder"] for r in res["claim1"] if r["name"] == name))
        pred, _ = _predict_one_by_one(folder, texts)
        assert float((pred == sentiment).float().mean()) == pytest.approx(reported[name], abs=1e-9), name


def test_reported_control_matches_frozen_probe(example):
    mod, res, _ = example
    data = mod.make_splits(fast=True)
    probe = torch.load(res["probe"])
    row = next(r for r in res["claim2"] if r["name"] == res["chosen"])
    topic = torch.tensor([r[2] for r in data["test"]])
    sentiment = torch.tensor([r[1] for r in data["test"]])
    pred, emb = _predict_one_by_one(Path(row["folder"]), [r[0] for r in data["test"]])
    control = float(((emb @ probe["weight"] + probe["bias"]).argmax(1) == topic).float().mean())
    assert control == pytest.approx(row["test"]["control"], abs=1e-9)
    assert float((pred == sentiment).float().mean()) == pytest.approx(row["test"]["target"], abs=1e-9)


def test_verdicts_follow_from_the_numbers(example):
    _, res, printed = example
    acc = {r["name"]: r["test"] for r in res["claim1"]}
    gain = acc["A_ft"] - acc["A"]
    if gain:
        rec = {k: (acc[f"{k} + (A_ft - A)"] - acc[k]) / gain for k in ("B", "C", "P")}
        assert res["recovered"] == pytest.approx(rec)
        assert res["claim1_reproduced"] == (rec["B"] >= 0.5 and rec["C"] < 0.5 and rec["P"] < 0.5)
    rows = {r["name"]: r for r in res["claim2"]}
    lines_rows = [r for r in res["claim2"] if r["alpha"] is not None and r["alpha"] < 1]
    best = max(r["select"] for r in lines_rows)
    assert rows[res["chosen"]]["select"] == best
    for r in res["claim2"]:
        assert r["select"] == pytest.approx(2 * r["val"]["target"] + r["val"]["control"])
    pre, full, chosen = rows["pretrained A"]["test"], rows["full fine-tune A_ft"]["test"], rows[res["chosen"]]["test"]
    if full["target"] != pre["target"] and pre["control"] > full["control"]:
        kept = (chosen["target"] - pre["target"]) / (full["target"] - pre["target"])
        removed = 1 - (pre["control"] - chosen["control"]) / (pre["control"] - full["control"])
        assert res["claim2_reproduced"] == (kept >= 0.5 and removed >= 0.25)
    for claim in ("claim1", "claim2"):
        verdict = res[f"{claim}_verdict"]
        assert f"verdict ({claim[:5]} {claim[5]}): {verdict}" in printed
        flag = res[f"{claim}_reproduced"]
        assert verdict.startswith({True: "REPRODUCED", False: "NOT reproduced", None: "cannot"}[flag])
