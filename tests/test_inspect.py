"""inspect: layout from headers; with several checkpoints, what differs and by how much."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import surgery
from surgery_cli.app import app
from _support import load_model_state, read_folder, write_st

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})


def per_file(folder):
    """file name -> (tensor count, bytes), and name -> (dtype, shape), from safetensors itself."""
    files, tensors = {}, {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            n = b = 0
            for k in sf.keys():
                s = sf.get_slice(k)
                t = sf.get_tensor(k)
                tensors[k] = (s.get_dtype(), tuple(s.get_shape()), t.numel(), t.numel() * t.element_size())
                n += 1
                b += t.numel() * t.element_size()
            files[f.name] = (n, b)
    return files, tensors


@pytest.mark.parametrize("family,variant", [("llama", "base"), ("llama", "bf16a"), ("gpt2", "base")])
def test_single_checkpoint_summary(request, family, variant):
    folder = getattr(request.getfixturevalue(family), variant)
    files, tensors = per_file(folder)
    report = surgery.inspect([folder])
    assert report.comparison is None
    s = report.checkpoints[0]
    assert s.source == str(folder)
    assert s.tensors == len(tensors)
    assert s.parameters == sum(t[2] for t in tensors.values())
    assert s.bytes == sum(t[3] for t in tensors.values())
    dtypes = {}
    for d, _, n, _ in tensors.values():
        dtypes[d] = dtypes.get(d, 0) + n
    assert s.dtypes == dtypes
    assert {sh.file: (sh.tensors, sh.bytes) for sh in s.shards} == files
    assert {n: (d, tuple(sh)) for n, d, sh in report.tensors} == {k: v[:2] for k, v in tensors.items()}


@pytest.mark.parametrize("family,head,embedding", [
    ("qwen2", "lm_head.weight", "model.embed_tokens.weight"),
    ("gpt2", "lm_head.weight", "transformer.wte.weight"),
    ("bert", "cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
    ("minilm", None, None),  # a BertModel: no output head at all
])
def test_tied_head_reported(request, family, head, embedding):
    """The summary names the head the architecture actually ties, and no head it does not have."""
    fam = request.getfixturevalue(family)
    folder = fam.real if family == "minilm" else fam.base
    state, _, _ = load_model_state(folder, fam.auto)
    stored = read_folder(folder)
    if head is not None:
        assert head in state and head not in stored  # what transformers itself ties
    else:
        assert set(state) <= set(stored)  # nothing tied: every tensor is stored
    r = invoke("inspect", folder, "--summary")
    assert r.exit_code == 0, r.output
    if head is not None:
        assert f"tied: {head} -> {embedding}" in r.stdout
    else:
        assert "tied:" not in r.stdout
    s = surgery.inspect([folder]).checkpoints[0]
    assert s.tied == ({head: embedding} if head else {})


def test_untied_reports_nothing_tied(llama, qwen2):
    assert surgery.inspect([llama.base]).checkpoints[0].tied == {}
    assert surgery.inspect([qwen2.untied]).checkpoints[0].tied == {}


@pytest.fixture
def differing(tmp_path):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 4, generator=g)
    a = write_st(tmp_path / "a" / "model.safetensors", {
        "shared.w": w, "shared.zero": torch.zeros(3), "shape.s": torch.ones(3), "only.a": torch.ones(2),
        "ids": torch.arange(5)}).parent
    b = write_st(tmp_path / "b" / "model.safetensors", {
        "shared.w": w + 0.1 * torch.randn(6, 4, generator=g), "shared.zero": torch.zeros(3),
        "shape.s": torch.ones(4), "only.b": torch.ones(2), "ids": torch.arange(5) + 2}).parent
    c = write_st(tmp_path / "c" / "model.safetensors", {
        "shared.w": -w, "shared.zero": torch.ones(3), "shape.s": torch.ones(3), "only.a": torch.ones(2),
        "ids": torch.arange(5)}).parent
    return a, b, c


def rel_l2(a, b):
    a, b = a.to(torch.float64), b.to(torch.float64)
    na = float(torch.linalg.vector_norm(a))
    d = float(torch.linalg.vector_norm(b - a))
    return d / na if na else (0.0 if d == 0 else math.inf)


def test_two_checkpoints_compared(differing):
    a, b, _ = differing
    report = surgery.inspect([a, b])
    c = report.comparison
    assert c.only_in == {"only.a": [str(a)], "only.b": [str(b)]}
    assert {k: [tuple(s) for s in v] for k, v in c.shape_differs.items()} == {"shape.s": [(3,), (4,)]}
    fa, fb = read_folder(a), read_folder(b)
    shared = {"shared.w", "shared.zero", "ids"}
    assert set(c.relative_l2) == shared
    for k in shared:
        assert c.relative_l2[k] == pytest.approx([rel_l2(fa[k], fb[k])], rel=1e-12), k
    assert c.relative_l2["shared.zero"] == [0.0]
    assert 0.05 < c.relative_l2["shared.w"][0] < 0.5
    assert len(report.checkpoints) == 2 and report.checkpoints[1].tensors == 5


def test_three_checkpoints_distance_to_first(differing):
    a, b, c3 = differing
    c = surgery.inspect([a, b, c3]).comparison
    assert c.only_in == {"only.a": [str(a), str(c3)], "only.b": [str(b)]}
    assert set(c.shape_differs) == {"shape.s"}
    fa, fb = read_folder(a), read_folder(b)
    assert c.relative_l2["shared.w"] == pytest.approx([rel_l2(fa["shared.w"], fb["shared.w"]), 2.0], rel=1e-12)
    assert c.relative_l2["shared.zero"] == [0.0, math.inf]


def test_headers_only_comparison(differing):
    a, b, _ = differing
    c = surgery.inspect([a, b], distances=False).comparison
    assert set(c.only_in) == {"only.a", "only.b"} and set(c.shape_differs) == {"shape.s"}
    assert c.relative_l2 == {}


def test_real_models_relative_l2(llama, qwen2):
    report = surgery.inspect([llama.base, llama.v1, llama.v2])
    fa, fb, fc = read_folder(llama.base), read_folder(llama.v1), read_folder(llama.v2)
    c = report.comparison
    assert c.only_in == {} and c.shape_differs == {}
    assert set(c.relative_l2) == set(fa)
    for k in fa:
        assert c.relative_l2[k] == pytest.approx([rel_l2(fa[k], fb[k]), rel_l2(fa[k], fc[k])], rel=1e-9), k
    # a tied head compared with a stored one: the embedding stands in for the tied model's head
    t, u = read_folder(qwen2.base), read_folder(qwen2.untied)
    c = surgery.inspect([qwen2.base, qwen2.untied]).comparison
    assert c.only_in == {}
    assert c.relative_l2["lm_head.weight"] == pytest.approx(
        [rel_l2(t["model.embed_tokens.weight"], u["lm_head.weight"])], rel=1e-9)


def test_cli_single(llama):
    files, tensors = per_file(llama.base)
    r = invoke("inspect", llama.base)
    assert r.exit_code == 0, r.output
    out = r.stdout
    n = sum(t[2] for t in tensors.values())
    assert f"{llama.base}: {len(tensors)} tensors, {n:,} parameters" in out
    for f, (count, _) in files.items():
        assert f"{f}: {count} tensors" in out
    for k, (d, shape, _, _) in tensors.items():
        line = next(line for line in out.splitlines() if line.strip().startswith(k + " "))
        assert d in line and str(list(shape)) in line
    r = invoke("inspect", llama.base, "--summary")
    assert r.exit_code == 0 and "model.layers.0.mlp.up_proj.weight" not in r.stdout


def test_cli_compare(differing):
    a, b, _ = differing
    r = invoke("inspect", a, b)
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert f"only in some: only.a (in {a})" in out and f"only in some: only.b (in {b})" in out
    assert "shape differs: shape.s: [3] vs [4]" in out
    fa, fb = read_folder(a), read_folder(b)
    d = rel_l2(fa["shared.w"], fb["shared.w"])
    line = next(line for line in out.splitlines() if line.strip().startswith("shared.w"))
    assert f"{d:.4g}" in line
    r = invoke("inspect", a, b, "--json")
    assert r.exit_code == 0
    data = json.loads(r.stdout)
    assert data["comparison"]["relative_l2"]["shared.w"] == pytest.approx([d], rel=1e-12)
    assert set(data["comparison"]["only_in"]) == {"only.a", "only.b"}
    assert data["comparison"]["shape_differs"] == {"shape.s": [[3], [4]]}
    assert [c["tensors"] for c in data["checkpoints"]] == [5, 5]


def test_cli_same_layout_message(llama):
    r = invoke("inspect", llama.base, llama.v1, "--headers-only")
    assert r.exit_code == 0, r.output
    assert "same tensor names and shapes in all checkpoints" in r.stdout


def test_cli_inspect_refuses(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes(b"\xff" * 16)
    r = invoke("inspect", bad)
    assert r.exit_code != 0 and str(bad / "model.safetensors") in r.stderr
