"""Grafting: exact streamed global top-k against a brute-force in-memory selection, edge sparsities,
deterministic ties, mask files and their reports."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_np

from surgery.errors import SurgeryError
from surgery.recipes.graft import graft
from surgery.recipes.mask_report import overlap, stats
from _support import read_folder
from sparse_support import brute_force_masks, read_mask_file, selected_names, stored_order
from tv_support import write_checkpoint


def _expected(base_dir, ft_dir, k, include=None):
    base, ft = read_folder(base_dir), read_folder(ft_dir)
    names = selected_names(base, ft, stored_order(ft_dir), include)
    masks = brute_force_masks(base, ft, names, k)
    out = {n: torch.where(torch.from_numpy(masks[n]), ft[n], base[n]) if n in masks else base[n] for n in ft}
    return out, masks, sum(base[n].numel() for n in names)


@pytest.mark.parametrize("family", ["llama", "llama-bf16", "gpt2"])
@pytest.mark.parametrize("sparsity", [0.001, 0.05, 0.5])
def test_graft_equals_brute_force_global_topk(zoo, tmp_path, family, sparsity):
    base, ft = zoo[f"{family}/base"], zoo[f"{family}/ft1"]
    graft(base, ft, tmp_path / "out", sparsity=sparsity, mask_out=tmp_path / "mask.safetensors", device="cpu")
    got = read_folder(tmp_path / "out")
    _, masks, total = _expected(base, ft, 0)
    k = round(sparsity * total)
    expected, masks, _ = _expected(base, ft, k)
    assert sorted(got) == sorted(expected)
    for n in expected:
        assert got[n].dtype == expected[n].dtype and torch.equal(got[n].view(torch.uint8), expected[n].view(torch.uint8)), n
    meta, mask_file = read_mask_file(tmp_path / "mask.safetensors")
    assert int(meta["kept"]) == k == sum(int(m.sum()) for m in masks.values())
    assert int(meta["total"]) == total and meta["format"] == "surgery-mask"
    assert sorted(mask_file) == sorted(masks)
    for n in masks:
        assert np.array_equal(mask_file[n], masks[n]), n
    assert json.loads(meta["recipe"])["k"] == k


def test_sparsity_zero_is_the_base_and_one_is_the_fine_tune_bit_for_bit(zoo, tmp_path):
    base, ft = zoo["llama-bf16/base"], zoo["llama-bf16/ft1"]
    graft(base, ft, tmp_path / "zero", sparsity=0.0, device="cpu")
    graft(base, ft, tmp_path / "one", sparsity=1.0, include=[".*"], device="cpu")
    b, f = read_folder(base), read_folder(ft)
    for name, t in read_folder(tmp_path / "zero").items():
        assert torch.equal(t.view(torch.uint8), b[name].view(torch.uint8)), name
    for name, t in read_folder(tmp_path / "one").items():
        assert torch.equal(t.view(torch.uint8), f[name].view(torch.uint8)), name
    # by default only tensors inside the blocks are grafted: embeddings and head stay the base's
    graft(base, ft, tmp_path / "blocks", sparsity=1.0, device="cpu")
    out = read_folder(tmp_path / "blocks")
    assert torch.equal(out["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], f["model.layers.1.mlp.up_proj.weight"])


def test_ties_at_the_threshold_go_to_the_first_entries_in_file_order(tmp_path):
    """Every entry changes by exactly 0.5: any 7 would do, the rule says the first 7 in file order."""
    shapes = {"model.layers.0.a": (3, 4), "model.layers.0.b": (5,), "model.layers.1.a": (2, 2)}
    base = {n: torch.zeros(s) for n, s in shapes.items()}
    ft = {n: torch.full(s, 0.5) for n, s in shapes.items()}
    ft["model.layers.1.a"][1, 1] = 2.0  # one clear winner, in the last tensor
    b = write_checkpoint(tmp_path / "base", base)
    f = write_checkpoint(tmp_path / "ft", ft)
    graft(b, f, tmp_path / "out", k=7, mask_out=tmp_path / "m.safetensors", device="cpu")
    _, mask = read_mask_file(tmp_path / "m.safetensors")
    order = stored_order(f)
    flat = np.concatenate([mask[n].reshape(-1) for n in order])
    sizes = [int(np.prod(shapes[n])) for n in order]
    assert flat.sum() == 7
    winner = sum(sizes[: order.index("model.layers.1.a")]) + 3
    assert flat[winner]
    assert np.flatnonzero(flat).tolist()[:6] == list(range(6))  # the six ties taken first come first
    expected, _, _ = _expected(b, f, 7)
    for n, t in read_folder(tmp_path / "out").items():
        assert torch.equal(t, expected[n]), n


def test_graft_cli_and_mask_reports(zoo, tmp_path, cli):
    base, ft1, ft2 = zoo["llama/base"], zoo["llama/ft1"], zoo["llama/ft2"]
    cli("graft", "--base", base, "--ft", ft1, "--sparsity", "0.01", "-o", tmp_path / "g1",
        "--mask-out", tmp_path / "m1.safetensors", "--device", "cpu", "-q")
    cli("graft", "--base", base, "--ft", ft2, "--sparsity", "0.01", "-o", tmp_path / "g2",
        "--mask-out", tmp_path / "m2.safetensors", "--device", "cpu", "-q")
    text = cli("mask", "stats", tmp_path / "m1.safetensors").output
    assert "density" in text and "model.layers.0" in text
    report = json.loads(cli("mask", "stats", tmp_path / "m1.safetensors", "--json").output)
    _, m1 = read_mask_file(tmp_path / "m1.safetensors")
    _, m2 = read_mask_file(tmp_path / "m2.safetensors")
    layer0 = [n for n in m1 if ".layers.0." in n]
    assert report["layers"]["model.layers.0"]["kept"] == sum(int(m1[n].sum()) for n in layer0)
    assert report["tensors"][layer0[0]]["density"] == pytest.approx(m1[layer0[0]].mean())
    pair = json.loads(cli("mask", "overlap", tmp_path / "m1.safetensors", tmp_path / "m2.safetensors",
                          "--json").output)["pairs"][0]
    inter = sum(int((m1[n] & m2[n]).sum()) for n in m1)
    union = sum(int((m1[n] | m2[n]).sum()) for n in m1)
    assert pair["intersection"] == inter and pair["iou"] == pytest.approx(inter / union)
    # refusals: an existing mask file is kept unless --force
    before = (tmp_path / "m1.safetensors").read_bytes()
    result = cli("graft", "--base", base, "--ft", ft2, "--sparsity", "0.02", "-o", tmp_path / "g3",
                 "--mask-out", tmp_path / "m1.safetensors", "--device", "cpu", "-q", ok=False)
    assert "exists" in result.output and (tmp_path / "m1.safetensors").read_bytes() == before
    assert not (tmp_path / "g3").exists()
    cli("graft", "--base", base, "--ft", ft1, "-o", tmp_path / "g4", ok=False)  # neither --sparsity nor --k


def _mask_file(path, tensors: dict[str, np.ndarray], encoding: str = "bits"):
    """A mask file written by hand from the documented format."""
    entries, info = {}, {}
    for name, m in tensors.items():
        flat = m.reshape(-1)
        if encoding == "indices":
            entries[name] = np.flatnonzero(flat).astype(np.int64)
        else:
            packed = np.packbits(flat, bitorder="little")
            entries[name] = np.concatenate([packed, np.zeros(-(-flat.size // 64) * 8 - packed.size, np.uint8)])
        info[name] = {"shape": list(m.shape), "encoding": encoding, "kept": int(flat.sum())}
    kept = sum(v["kept"] for v in info.values())
    total = sum(m.size for m in tensors.values())
    save_np(entries, str(path), metadata={"format": "surgery-mask", "version": "1", "tensors": json.dumps(info),
                                          "kept": str(kept), "total": str(total), "density": str(kept / total)})
    return path


def test_overlap_on_hand_made_masks(tmp_path):
    a = _mask_file(tmp_path / "a.safetensors", {
        "encoder.layer.0.w": np.array([[1, 1, 0], [0, 1, 0]], bool),
        "encoder.layer.1.w": np.array([1, 0, 0, 0], bool),
        "classifier.w": np.array([0, 0], bool)})
    b = _mask_file(tmp_path / "b.safetensors", {
        "encoder.layer.0.w": np.array([[0, 1, 1], [0, 1, 0]], bool),
        "encoder.layer.1.w": np.array([0, 1, 1, 0], bool)}, encoding="indices")
    c = _mask_file(tmp_path / "c.safetensors", {"encoder.layer.1.w": np.array([1, 0, 0, 0], bool)})
    report = overlap([a, b, c])
    ab, ac, bc = report["pairs"]
    # a has 4 entries, b has 5; they share 2 (both in layer 0)
    assert (ab["intersection"], ab["union"]) == (2, 7)
    assert ab["iou"] == pytest.approx(2 / 7) and ab["overlap"] == pytest.approx(2 / 4)
    assert ab["layers"]["encoder.layer.0"]["iou"] == pytest.approx(2 / 4)
    assert ab["layers"]["encoder.layer.1"]["intersection"] == 0
    assert (ac["intersection"], ac["union"], ac["overlap"]) == (1, 4, 1.0)
    assert (bc["intersection"], bc["iou"]) == (0, 0.0)
    s = stats(b)
    assert s["kept"] == 5 and s["total"] == 10 and s["layers"]["encoder.layer.1"]["density"] == 0.5


def test_a_mask_file_that_contradicts_its_metadata_is_refused(tmp_path):
    info = {"layers.0.w": {"shape": [10], "encoding": "indices", "kept": 3}}
    save_np({"layers.0.w": np.array([1, 2], np.int64)}, str(tmp_path / "bad.safetensors"),
            metadata={"format": "surgery-mask", "version": "1", "tensors": json.dumps(info)})
    with pytest.raises(SurgeryError, match="layers.0.w"):
        stats(tmp_path / "bad.safetensors")
    save_np({"w": np.zeros(8, np.uint8)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(SurgeryError, match="not a surgery mask"):
        stats(tmp_path / "plain.safetensors")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_narrow_differences_have_the_same_float32_magnitudes_in_float32(dtype):
    """The selection of narrow floats' differences runs in float32 (engine.topk.narrow_difference):
    its magnitude bits must equal those of the float64 difference rounded to float32, including
    for operands whose exponents are far apart, subnormals, zeros, infinities and NaNs."""
    from surgery.ops.common import magnitude_bits

    g = torch.Generator().manual_seed(0)
    n = 1 << 18
    kind = getattr(torch, dtype)
    info = torch.finfo(kind)
    # magnitudes spread over the whole exponent range, both signs, plus a near copy of each value
    exps = torch.randint(int(math.log2(info.tiny)) - 8, int(math.log2(info.max)), (n,), generator=g).double()
    a = (torch.rand(n, generator=g, dtype=torch.float64) + 1) * torch.exp2(exps) * torch.where(
        torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    b = torch.where(torch.rand(n, generator=g) < 0.5, a * (1 + 1e-3 * torch.randn(n, generator=g, dtype=torch.float64)),
                    torch.flip(a, [0]))
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), info.tiny, -info.tiny,
                            info.tiny / 4, info.max, -info.max], dtype=torch.float64)
    a = torch.cat([a, special, special]).to(kind)
    b = torch.cat([b, special, torch.flip(special, [0])]).to(kind)
    narrow = magnitude_bits(a.float() - b.float())
    wide = magnitude_bits(a.double() - b.double())
    both_nan = torch.isnan(a.float() - b.float()) & torch.isnan(a.double() - b.double())
    assert torch.equal(narrow[~both_nan], wide[~both_nan])
    assert torch.equal(narrow[both_nan] >= 0x7F800001, torch.ones_like(narrow[both_nan], dtype=torch.bool))
