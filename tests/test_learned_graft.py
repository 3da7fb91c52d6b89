"""Learned grafting on a real tiny fine-tuned classifier: the written model is exactly the graft of
the written mask, the chosen epoch is the best one, and --mask re-applies a mask byte for byte."""
from __future__ import annotations

import json

import numpy as np
import torch

from _support import read_folder
from sparse_support import read_mask_file


def _fine_tuned_classifier(tmp_path):
    """A pretrained (MLM) BERT as the base, and a classifier fine-tuned from it on a learnable rule."""
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification
    from tv_support import make_tokenizer

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=64, max_position_embeddings=32)
    tok = make_tokenizer(60)
    BertForMaskedLM(cfg).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=2)
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(48):
        ids = rng.integers(0, 40, size=6)
        rows.append({"text": " ".join(f"w{i}" for i in ids), "label": int(ids[0] < 20)})
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(30):
        enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
        loss = model(**enc, labels=torch.tensor([r["label"] for r in rows])).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(tmp_path / "ft")
    tok.save_pretrained(tmp_path / "ft")
    for name, part in (("train", rows[:32]), ("val", rows[32:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return tmp_path / "base", tmp_path / "ft"


def test_learned_graft_writes_the_graft_of_its_mask(tmp_path, cli):
    base, ft = _fine_tuned_classifier(tmp_path)
    # a large learning rate so that the relaxed mask visibly moves on this tiny, easy task
    cli("graft", "--base", base, "--ft", ft, "--sparsity", "0.002", "--learn", "--data", tmp_path / "train.jsonl",
        "--eval-data", tmp_path / "val.jsonl", "--epochs", "3", "--lr", "1e10", "-o", tmp_path / "learned",
        "--mask-out", tmp_path / "mask.safetensors", "--device", "cpu", "-q")
    meta, mask = read_mask_file(tmp_path / "mask.safetensors")
    recipe = json.loads(meta["recipe"])
    history = recipe["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[-1]["kept"] != history[0]["kept"]  # training moved the mask
    scores = [h["train"] + h["val"] for h in history]
    assert recipe["best_epoch"] == int(np.argmax(scores))  # the first best epoch is kept
    assert int(meta["kept"]) == history[recipe["best_epoch"]]["kept"]
    b, f, out = read_folder(base), read_folder(ft), read_folder(tmp_path / "learned")
    assert sorted(out) == sorted(f)
    for name, t in out.items():
        if name in mask:
            expected = torch.where(torch.from_numpy(mask[name]), f[name], b[name])
        else:
            expected = b[name] if name in b and b[name].shape == f[name].shape else f[name]
        assert torch.equal(t, expected), name
    assert torch.equal(out["classifier.weight"], f["classifier.weight"])  # the base has no head
    # epoch 0 is the weight-only top-k mask (basepatch): its size is the top-k's
    assert history[0]["kept"] == recipe["k"]
    cli("graft", "--base", base, "--ft", ft, "--mask", tmp_path / "mask.safetensors", "-o", tmp_path / "again",
        "--device", "cpu", "-q")
    again = read_folder(tmp_path / "again")
    for name, t in out.items():
        assert torch.equal(t.view(torch.uint8), again[name].view(torch.uint8)), name
