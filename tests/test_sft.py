"""Sparse fine-tunes: extract, apply, compose and revert, against brute-force references; the
composable-sft pytorch_diff.bin format, 3-D tensors included."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from surgery.errors import SurgeryError
from surgery.recipes.sft import apply, extract, revert
from _support import assert_close_ulp, read_folder
from sparse_support import brute_force_masks, selected_names, stored_order
from tv_support import content_hash, write_checkpoint


def _sft(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("family", ["llama", "llama-bf16"])
def test_extract_then_apply_gives_the_fine_tune_at_kept_entries_and_the_base_elsewhere(zoo, tmp_path, family):
    base_dir, ft_dir = zoo[f"{family}/base"], zoo[f"{family}/ft1"]
    extract(base_dir, ft_dir, tmp_path / "task.sft", density=0.02, device="cpu")
    base, ft = read_folder(base_dir), read_folder(ft_dir)
    names = selected_names(base, ft, stored_order(ft_dir), include=".*")
    total = sum(base[n].numel() for n in names)
    k = round(0.02 * total)
    masks = brute_force_masks(base, ft, names, k)
    meta, entries = _sft(tmp_path / "task.sft")
    assert meta["format"] == "surgery-sft" and int(meta["kept"]) == k and int(meta["total"]) == total
    assert meta["base_sha256"] == content_hash(base_dir)
    for n in names:  # the stored indices are exactly the brute-force selection
        idx = entries.get(n + ".indices", torch.zeros(0, dtype=torch.int64))
        assert idx.tolist() == np.flatnonzero(masks[n].reshape(-1)).tolist(), n
    apply(base_dir, [tmp_path / "task.sft"], tmp_path / "applied", device="cpu")
    out = read_folder(tmp_path / "applied")
    assert sorted(out) == sorted(base)
    for n in names:
        m = torch.from_numpy(masks[n])
        assert torch.equal(out[n][~m], base[n][~m]), n  # untouched entries are the base's bytes
        assert_close_ulp(out[n][m], ft[n][m], 1, n)  # kept entries are the fine-tune's (within an ulp)
    revert(tmp_path / "applied", [tmp_path / "task.sft"], tmp_path / "reverted", device="cpu")
    for n, t in read_folder(tmp_path / "reverted").items():
        assert_close_ulp(t, base[n], 1, n)


def test_composing_disjoint_sfts_equals_applying_them_one_after_the_other(zoo, tmp_path):
    base_dir = zoo["llama-bf16/base"]
    extract(base_dir, zoo["llama-bf16/ft1"], tmp_path / "a.sft", density=0.05, include=[r"layers\.0\."], device="cpu")
    extract(base_dir, zoo["llama-bf16/ft2"], tmp_path / "b.sft", density=0.05, include=[r"layers\.1\."], device="cpu")
    _, a = _sft(tmp_path / "a.sft")
    _, b = _sft(tmp_path / "b.sft")
    assert a and b and not {k for k in a if k.endswith(".indices")} & {k for k in b if k.endswith(".indices")}
    apply(base_dir, [tmp_path / "a.sft", tmp_path / "b.sft"], tmp_path / "both", device="cpu")
    apply(base_dir, [tmp_path / "a.sft"], tmp_path / "first", device="cpu")
    apply(tmp_path / "first", [tmp_path / "b.sft"], tmp_path / "then", device="cpu")
    both, then = read_folder(tmp_path / "both"), read_folder(tmp_path / "then")
    for n in both:
        assert torch.equal(both[n].view(torch.uint8), then[n].view(torch.uint8)), n
    base = read_folder(base_dir)
    changed = [n for n in both if not torch.equal(both[n], base[n])]
    assert any(".layers.0." in n for n in changed) and any(".layers.1." in n for n in changed)


def test_dense_and_absolute_parts(tmp_path):
    """A fully tuned tensor is stored whole; a tensor the base lacks is stored as the fine-tune's values."""
    base = {"model.layers.0.w": torch.zeros(4, 4), "model.norm.weight": torch.ones(4)}
    ft = {"model.layers.0.w": torch.arange(16.0).reshape(4, 4) / 16, "model.norm.weight": torch.full((4,), 1.5),
          "score.weight": torch.randn(3, 4)}
    b = write_checkpoint(tmp_path / "base", base)
    f = write_checkpoint(tmp_path / "ft", ft)
    extract(b, f, tmp_path / "t.sft", k=3, dense=[r"norm"], device="cpu")
    meta, entries = _sft(tmp_path / "t.sft")
    info = json.loads(meta["tensors"])
    assert info["model.norm.weight"]["kind"] == "dense" and info["score.weight"]["kind"] == "absolute"
    assert entries["model.layers.0.w.indices"].tolist() == [13, 14, 15]
    apply(b, [tmp_path / "t.sft"], tmp_path / "out", device="cpu")
    out = read_folder(tmp_path / "out")
    assert torch.equal(out["score.weight"], ft["score.weight"])
    assert torch.equal(out["model.norm.weight"], ft["model.norm.weight"])
    expected = torch.zeros(16)
    expected[13:] = torch.arange(13.0, 16.0) / 16
    assert torch.equal(out["model.layers.0.w"].reshape(-1), expected)


def test_an_sft_for_another_architecture_is_refused_naming_every_tensor(zoo, tmp_path):
    extract(zoo["llama/base"], zoo["llama/ft1"], tmp_path / "l.sft", density=0.01, device="cpu")
    with pytest.raises(SurgeryError, match=r"l\.sft.*not in the model"):
        apply(zoo["gpt2/base"], [tmp_path / "l.sft"], tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


def _encode_composable(dense: torch.Tensor) -> dict:
    """composable-sft's encoder, written out: flat indices with the first dimension varying fastest,
    sorted, delta-encoded with the first index absolute (a numpy integer, as theirs leaves it)."""
    coords = dense.nonzero().T.numpy().astype(np.int64)
    multipliers = np.cumprod([1] + list(dense.shape)[:-1], dtype=np.int64)
    flat = multipliers @ coords
    perm = np.argsort(flat)
    flat = flat[perm]
    values = dense[tuple(torch.from_numpy(coords[:, perm]))]
    steps = [flat[0]] + (flat[1:] - flat[:-1]).tolist() if flat.size else []
    return {"size": dense.shape, "index_steps": steps, "values": values}


def test_pytorch_diff_bin_with_a_3d_tensor_decodes_correctly(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"encoder.layer.0.w": torch.randn(2, 3, 4, generator=g), "encoder.layer.0.v": torch.randn(5, 6, generator=g),
            "classifier.weight": torch.zeros(2, 6)}
    b = write_checkpoint(tmp_path / "base", base)
    diff3 = torch.zeros(2, 3, 4)
    diff3[0, 2, 1], diff3[1, 0, 3], diff3[1, 2, 0] = 0.5, -1.25, 2.0
    diff2 = torch.zeros(5, 6)
    diff2[4, 0], diff2[0, 5] = 0.75, -0.5
    head = torch.randn(2, 6, generator=g)
    sft_dir = tmp_path / "composable"
    sft_dir.mkdir()
    torch.save({"diffs": {"encoder.layer.0.w": _encode_composable(diff3), "encoder.layer.0.v": _encode_composable(diff2)},
                "abs": {"classifier.weight": head}}, sft_dir / "pytorch_diff.bin")
    with pytest.raises(SurgeryError, match="allow-pickle"):
        apply(b, [sft_dir], tmp_path / "refused", device="cpu")
    apply(b, [sft_dir], tmp_path / "out", allow_pickle=True, device="cpu")
    out = read_folder(tmp_path / "out")
    assert torch.equal(out["encoder.layer.0.w"], (base["encoder.layer.0.w"].double() + diff3.double()).float())
    assert torch.equal(out["encoder.layer.0.v"], (base["encoder.layer.0.v"].double() + diff2.double()).float())
    assert torch.equal(out["classifier.weight"], head)


def test_sft_cli(zoo, tmp_path, cli):
    base, ft = zoo["gpt2/base"], zoo["gpt2/ft1"]
    cli("sft", "extract", "--base", base, "--ft", ft, "--k", "500", "-o", tmp_path / "t.sft", "--device", "cpu", "-q")
    meta, _ = _sft(tmp_path / "t.sft")
    assert int(meta["kept"]) == 500
    cli("sft", "apply", base, "--sft", tmp_path / "t.sft", "-o", tmp_path / "a", "--device", "cpu", "-q")
    cli("sft", "revert", tmp_path / "a", "--sft", tmp_path / "t.sft", "-o", tmp_path / "r", "--device", "cpu", "-q")
    b = read_folder(base)
    for n, t in read_folder(tmp_path / "r").items():
        assert_close_ulp(t, b[n], 1, n)
    before = (tmp_path / "t.sft").read_bytes()
    cli("sft", "extract", "--base", base, "--ft", ft, "--k", "10", "-o", tmp_path / "t.sft", ok=False)
    assert (tmp_path / "t.sft").read_bytes() == before


def test_graft_and_extract_read_each_input_tensor_at_most_three_times(zoo, tmp_path, monkeypatch):
    """Two statistics passes and one writing pass: counted at the reader, per (file, tensor)."""
    from collections import Counter

    from surgery.io.mapped import MappedFiles
    from surgery.recipes.graft import graft

    reads: Counter = Counter()
    original = MappedFiles.view

    def counting(self, info, prefetch=True):
        reads[(info.file, info.name)] += 1
        return original(self, info, prefetch)

    monkeypatch.setattr(MappedFiles, "view", counting)
    base, ft = zoo["llama-bf16/base"], zoo["llama-bf16/ft1"]
    extract(base, ft, tmp_path / "t.sft", density=0.05, device="cpu")
    assert reads and max(reads.values()) <= 3, reads.most_common(3)
    reads.clear()
    graft(base, ft, tmp_path / "g", sparsity=0.05, mask_out=tmp_path / "m.safetensors", device="cpu")
    assert reads and max(reads.values()) <= 3, reads.most_common(3)
