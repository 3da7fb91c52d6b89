"""LT-SFT: a real (tiny) training run; entries outside the mask stay bit-identical to the base, and
the exported SFT applied to the base reproduces the trained model."""
from __future__ import annotations

import torch
from safetensors import safe_open

from surgery.lt_sft import export_sft, train_lt_sft
from surgery.recipes.sft import apply
from _support import assert_close_ulp, read_folder
from tv_support import content_hash


def _classifier_base(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     vocab_size=64, max_position_embeddings=32)
    BertForMaskedLM(cfg).bert.save_pretrained(tmp_path / "base")  # the pretrained encoder, no head
    return tmp_path / "base"


def _batches():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 64, (16, 12), generator=g)
    labels = (ids[:, 0] > 34).long()  # a learnable rule
    return lambda: [{"input_ids": ids[i:i + 8], "labels": labels[i:i + 8]} for i in (0, 8)]


def test_lt_sft_keeps_unselected_entries_bit_identical_and_exports_an_applicable_sft(tmp_path):
    from transformers import BertForSequenceClassification

    base_dir = _classifier_base(tmp_path)
    model = BertForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    model.save_pretrained(tmp_path / "theta0")  # the starting point: the encoder plus a fresh head
    start = read_folder(tmp_path / "theta0")
    pretrained = {f"bert.{n}" for n in read_folder(base_dir)}
    k = 300
    result = train_lt_sft(model, _batches(), k=k, full_steps=6, sparse_steps=6, lr=1e-2,
                          base_names=sorted(pretrained), weight_decay=0.01)
    trained = {n: p.detach() for n, p in result.model.named_parameters()}
    assert sum(int(m.sum()) for m in result.mask.values()) == k
    assert sorted(result.absolute) == sorted(set(trained) - pretrained)  # the head and the new pooler
    changed = 0
    for name in pretrained:
        ref, now = start[name], trained[name]
        mask = result.mask.get(name, torch.zeros(ref.shape, dtype=torch.bool))
        assert torch.equal(now[~mask].view(torch.int32), ref[~mask].view(torch.int32)), name  # bit for bit
        changed += int((now != ref).sum())
        if "LayerNorm" in name:
            assert name not in result.mask  # norms are frozen
    assert 0 < changed <= k  # the selected entries did train
    assert not torch.equal(trained["classifier.weight"], start["classifier.weight"])  # the head trains densely
    export_sft(result, tmp_path / "task.sft", base=tmp_path / "theta0")
    with safe_open(str(tmp_path / "task.sft"), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "surgery-sft" and int(meta["kept"]) == k
    assert meta["base_sha256"] == content_hash(tmp_path / "theta0")
    apply(tmp_path / "theta0", [tmp_path / "task.sft"], tmp_path / "applied", device="cpu")
    applied = read_folder(tmp_path / "applied")
    assert sorted(applied) == sorted(start)
    for name, t in applied.items():
        assert_close_ulp(t, trained[name], 1, name)
