"""Soups through the library: values against an independent reference, loaded back with transformers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import surgery
from _support import (TOKENIZER_FILES, assert_close_ulp, check_layout, file_dtypes, load_model_state, read_folder,
                      soup_reference, write_st)

MODES = {
    # mode: (weights passed, normalize, the weights the soup must use)
    "uniform": (None, True, [1 / 3, 1 / 3, 1 / 3]),
    "weighted": ([3.0, 1.0, 1.0], True, [3 / 5, 1 / 5, 1 / 5]),
    "no_normalize": ([0.7, 0.6, -0.2], False, [0.7, 0.6, -0.2]),
}
SHARD_BYTES = {"llama": 100_000}


def expected_state(inputs, auto, weights, out_dtype=None):
    """The reference soup of the inputs' state dicts as transformers loads them (tied heads included)."""
    states = [load_model_state(p, auto)[0] for p in inputs]
    out = {}
    for k, first in states[0].items():
        dtype = out_dtype if (out_dtype is not None and first.is_floating_point()) else first.dtype
        if first.is_floating_point():
            out[k] = soup_reference([s[k] for s in states], weights, dtype)
        else:
            out[k] = first.clone()
    return out


def assert_loads_as(out: Path, expected: dict, auto: str, like: Path) -> dict:
    """``from_pretrained`` the soup: same loading report as the input ``like`` (nothing missing,
    nothing left over), and every tensor of its state dict within 1 ulp of the reference."""
    state, info, config = load_model_state(out, auto, cache=False)
    _, like_info, _ = load_model_state(like, auto)
    assert info == like_info
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert set(state) == set(expected)
    exact = 0
    for k, v in expected.items():
        exact += assert_close_ulp(state[k], v, 1, k) == 0
    assert exact >= len(expected) * 0.9, f"only {exact} of {len(expected)} tensors are exact"
    return config


def assert_sidecars(out: Path, config_source: Path, overrides: dict | None = None):
    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((config_source / "config.json").read_text())
    source_config.update(overrides or {})
    assert config == source_config
    if (config_source / "generation_config.json").exists():
        assert (out / "generation_config.json").read_bytes() == (config_source / "generation_config.json").read_bytes()
    for name in TOKENIZER_FILES:
        assert (out / name).read_bytes() == (config_source / name).read_bytes(), name


def assert_card(out: Path, inputs, weights):
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card
    for p in inputs:
        assert str(p) in card
    record = json.loads((out / "surgery_recipe.json").read_text())
    assert record["recipe"]["operation"] == "soup"
    assert record["recipe"]["weights"] == pytest.approx(weights, rel=1e-12)
    assert [e["source"] for e in record["inputs"]] == [str(p) for p in inputs]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bert"])
def test_soup_matches_reference(arch, mode, request, tmp_path):
    fam = request.getfixturevalue(arch)
    inputs = [fam.base, fam.v1, fam.v2]
    given, normalize, weights = MODES[mode]
    shard = SHARD_BYTES.get(arch, 5_000_000_000)
    out = surgery.soup([str(p) for p in inputs], tmp_path / "soup", weights=given, normalize=normalize,
                       max_shard_size=shard, device="cpu")
    assert Path(out) == (tmp_path / "soup").resolve()

    assert_loads_as(out, expected_state(inputs, fam.auto, weights), fam.auto, fam.base)
    where = check_layout(out, shard)
    assert set(where) == set(read_folder(fam.base)), "the soup stores exactly the first input's tensors"
    if arch == "llama":
        assert len({f for f in where.values()}) >= 3
    else:
        assert set(where.values()) == {"model.safetensors"}
    assert_sidecars(out, fam.base)
    assert_card(out, inputs, weights)


def test_no_normalize_is_not_normalized(llama, tmp_path):
    """Weights summing to 3 used as given: every float tensor is the plain weighted sum."""
    inputs = [llama.base, llama.v1]
    out = surgery.soup(inputs, tmp_path / "sum", weights=[2.0, 1.0], normalize=False, max_shard_size="100KB")
    got = read_folder(out)
    a, b = read_folder(llama.base), read_folder(llama.v1)
    for k in a:
        assert_close_ulp(got[k], soup_reference([a[k], b[k]], [2.0, 1.0], torch.float32), 1, k)
    # and the same call normalised differs: the flag is what made the difference
    k = "model.embed_tokens.weight"
    assert not torch.allclose(got[k], soup_reference([a[k], b[k]], [2 / 3, 1 / 3], torch.float32))


@pytest.mark.parametrize("weights", [None, [1.0, 3.0]], ids=["uniform", "weighted"])
def test_minilm_soup(minilm, weights, tmp_path):
    inputs = [minilm.real, minilm.variant]
    w = [0.5, 0.5] if weights is None else [0.25, 0.75]
    out = surgery.soup(inputs, tmp_path / "minilm-soup", weights=weights, device="cpu")
    assert_loads_as(out, expected_state(inputs, "AutoModel", w), "AutoModel", minilm.real)
    check_layout(out, 5_000_000_000)
    got = read_folder(out)
    real = read_folder(minilm.real)
    assert set(got) == set(real)
    # the int64 buffer is carried from the first input, not averaged
    assert got["embeddings.position_ids"].dtype == torch.int64
    assert torch.equal(got["embeddings.position_ids"], real["embeddings.position_ids"])
    assert_sidecars(out, minilm.real, {"dtype": "float32"})  # the weights' dtype is recorded
    # the input's README is not copied: the output gets its own card
    assert (out / "README.md").read_text() != (minilm.real / "README.md").read_text()
    assert_card(out, inputs, w)
    from transformers import AutoTokenizer

    text = "weight space surgery"
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == \
        AutoTokenizer.from_pretrained(minilm.real)(text)["input_ids"]


@pytest.mark.parametrize("limit", ["40KB", 50_000])
def test_shards_respect_max_size(llama, limit, tmp_path):
    """The 64 KB embedding and head exceed a 40-50 KB limit and get a shard each; every other shard fits."""
    out = surgery.soup([llama.base, llama.v1], tmp_path / "s", max_shard_size=limit)
    size = 40_000 if limit == "40KB" else limit
    where = check_layout(out, size)
    files = sorted(set(where.values()))
    assert len(files) >= 6
    for big in ("model.embed_tokens.weight", "lm_head.weight"):
        assert [k for k, f in where.items() if f == where[big]] == [big]
    a, b = read_folder(llama.base), read_folder(llama.v1)
    got = read_folder(out)
    for k in a:
        assert_close_ulp(got[k], soup_reference([a[k], b[k]], [0.5, 0.5], torch.float32), 1, k)


def test_single_file_output_from_sharded_inputs(llama, tmp_path):
    out = surgery.soup([llama.base, llama.v1], tmp_path / "one")
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names
    assert not any("index" in n for n in names), names  # the inputs' index is not copied
    check_layout(out, 5_000_000_000)


@pytest.mark.parametrize("how", ["input", "folder"])
def test_config_from(llama, how, tmp_path):
    inputs = [llama.base, llama.v1, llama.v2]
    if how == "input":
        source = llama.v2
    else:  # any folder holding a config, not one of the inputs
        source = tmp_path / "configs"
        source.mkdir()
        for p in llama.v1.iterdir():
            if p.suffix in (".json", ".txt") and "index" not in p.name:
                (source / p.name).write_bytes(p.read_bytes())
        cfg = json.loads((source / "config.json").read_text())
        cfg["surgery_fixture"] = "from-folder"
        (source / "config.json").write_text(json.dumps(cfg))
    out = surgery.soup(inputs, tmp_path / "soup", config_from=str(source))
    assert json.loads((out / "config.json").read_text())["surgery_fixture"] == \
        ("llama-v2" if how == "input" else "from-folder")
    assert_sidecars(out, source)
    # the default is the first input
    out0 = surgery.soup(inputs, tmp_path / "soup0")
    assert json.loads((out0 / "config.json").read_text())["surgery_fixture"] == "llama-base"
    assert_sidecars(out0, llama.base)


def test_bf16_inputs_to_fp32(llama, tmp_path):
    inputs = [llama.bf16a, llama.bf16b]
    out = surgery.soup(inputs, tmp_path / "fp32", dtype="fp32", max_shard_size="100KB")
    assert file_dtypes(out) == {"F32"}
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32"
    # exact float32 means: no rounding to bfloat16 on the way
    expected = expected_state(inputs, llama.auto, [0.5, 0.5], out_dtype=torch.float32)
    got = assert_loads_as(out, expected, llama.auto, llama.bf16a)
    assert got["dtype"] in ("float32", torch.float32)
    state, _, _ = load_model_state(out, llama.auto, cache=False)
    assert all(v.dtype == torch.float32 for v in state.values())
    assert_sidecars(out, llama.bf16a, {"dtype": "float32"})


def test_bf16_soup_stays_bf16(llama, tmp_path):
    inputs = [llama.bf16a, llama.bf16b, llama.bf16a]
    out = surgery.soup(inputs, tmp_path / "bf16", weights=[1, 2, 1], max_shard_size="100KB")
    assert file_dtypes(out) == {"BF16"}
    check_layout(out, 100_000)
    expected = expected_state(inputs, llama.auto, [0.25, 0.5, 0.25])  # accumulated in fp32, cast once
    assert all(v.dtype == torch.bfloat16 for v in expected.values())
    assert_loads_as(out, expected, llama.auto, llama.bf16a)


@pytest.mark.parametrize("first", ["fp32", "bf16"])
def test_mixed_dtype_inputs(llama, first, tmp_path):
    """One float32 input and one bfloat16 input: the output takes the first input's dtype."""
    inputs = [llama.base, llama.bf16a] if first == "fp32" else [llama.bf16a, llama.base]
    out = surgery.soup(inputs, tmp_path / "mixed", max_shard_size="100KB")
    out_dtype = torch.float32 if first == "fp32" else torch.bfloat16
    assert file_dtypes(out) == {"F32" if first == "fp32" else "BF16"}
    a, b = read_folder(inputs[0]), read_folder(inputs[1])
    got = read_folder(out)
    for k in a:
        assert_close_ulp(got[k], soup_reference([a[k], b[k]], [0.5, 0.5], out_dtype), 1, k)
    assert_loads_as(out, expected_state(inputs, llama.auto, [0.5, 0.5]), llama.auto, inputs[0])
    assert json.loads((out / "config.json").read_text())["dtype"] == ("float32" if first == "fp32" else "bfloat16")


@pytest.mark.parametrize("order", ["tied_first", "untied_first", "two_tied_then_untied"])
def test_tied_and_untied_inputs(qwen2, order, tmp_path):
    """A tied input contributes its embedding where another input stores lm_head.weight."""
    inputs = {"tied_first": [qwen2.base, qwen2.untied], "untied_first": [qwen2.untied, qwen2.base],
              "two_tied_then_untied": [qwen2.base, qwen2.v1, qwen2.untied]}[order]
    n = len(inputs)
    w = [1 / n] * n
    out = surgery.soup(inputs, tmp_path / "soup")
    files = [read_folder(p) for p in inputs]
    emb = "model.embed_tokens.weight"
    heads = [f.get("lm_head.weight", f[emb]) for f in files]  # a tied model's head is its embedding
    got = read_folder(out)
    assert "lm_head.weight" in got
    assert_close_ulp(got["lm_head.weight"], soup_reference(heads, w, torch.float32), 1, "lm_head")
    assert_close_ulp(got[emb], soup_reference([f[emb] for f in files], w, torch.float32), 1, emb)
    assert not torch.equal(got["lm_head.weight"], got[emb])
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    # and transformers reads it back untied, with every tensor of the reference
    assert_loads_as(out, expected_state(inputs, qwen2.auto, w), qwen2.auto, qwen2.untied)
    state, _, _ = load_model_state(out, qwen2.auto, cache=False)
    assert torch.equal(state["lm_head.weight"], got["lm_head.weight"])
    check_layout(out, 5_000_000_000)


def test_tied_inputs_stay_tied(qwen2, tmp_path):
    out = surgery.soup([qwen2.base, qwen2.v1], tmp_path / "soup")
    assert "lm_head.weight" not in read_folder(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def _handmade(folder: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    write_st(folder / "model.safetensors", {
        "w": torch.randn(5, 3, generator=g),
        "half": torch.randn(4, generator=g).to(torch.float16),
        "ids": torch.randint(0, 1000, (7,), generator=g, dtype=torch.int64),
        "count": torch.randint(-50, 50, (2, 2), generator=g, dtype=torch.int32),
        "mask": torch.rand(6, generator=g) > 0.5,
        "bytes": torch.randint(0, 255, (3,), generator=g, dtype=torch.uint8),
    })
    return folder


@pytest.mark.parametrize("weights", [None, [0.1, 0.2, 0.7]])
def test_integer_and_bool_tensors_copied_from_first(tmp_path, weights):
    inputs = [_handmade(tmp_path / f"in{i}", 100 + i) for i in range(3)]
    files = [read_folder(p) for p in inputs]
    for k in ("ids", "count", "mask", "bytes"):  # the inputs really differ
        assert not torch.equal(files[0][k], files[1][k])
    out = surgery.soup(inputs, tmp_path / "out", weights=weights)
    got = read_folder(out)
    w = [1 / 3] * 3 if weights is None else weights
    for k in ("ids", "count", "mask", "bytes"):
        assert got[k].dtype == files[0][k].dtype
        assert torch.equal(got[k], files[0][k]), k
    assert_close_ulp(got["w"], soup_reference([f["w"] for f in files], w, torch.float32), 1, "w")
    assert_close_ulp(got["half"], soup_reference([f["half"] for f in files], w, torch.float16), 1, "half")
    # a dtype change applies to floating tensors only
    out64 = surgery.soup(inputs, tmp_path / "out64", weights=weights, dtype="fp64")
    got64 = read_folder(out64)
    assert got64["w"].dtype == torch.float64 and got64["ids"].dtype == torch.int64
    assert torch.equal(got64["mask"], files[0]["mask"])
    check_layout(out64, 5_000_000_000)


def test_progress_callback_sees_every_tensor(llama, tmp_path):
    seen = []
    surgery.soup([llama.base, llama.v1], tmp_path / "p", progress=seen.append, max_shard_size="100KB")
    n = len(read_folder(llama.base))
    assert [p.tensors_done for p in seen] == list(range(1, n + 1))
    assert {p.tensors_total for p in seen} == {n}
    assert sorted(p.name for p in seen) == sorted(read_folder(llama.base))
    assert seen[-1].bytes_done == seen[-1].bytes_total == 2 * sum(
        t.numel() * t.element_size() for t in read_folder(llama.base).values())


def test_soup_accepts_opened_checkpoints(qwen2, tmp_path):
    ckpts = [surgery.open_checkpoint(qwen2.base), surgery.open_checkpoint(qwen2.v1)]
    out = surgery.soup(ckpts, tmp_path / "o")
    a, b = read_folder(qwen2.base), read_folder(qwen2.v1)
    got = read_folder(out)
    for k in a:
        assert_close_ulp(got[k], soup_reference([a[k], b[k]], [0.5, 0.5], a[k].dtype), 1, k)


@pytest.mark.parametrize("dtype,torch_dtype,name", [("bf16", torch.bfloat16, "bfloat16"),
                                                    ("float16", torch.float16, "float16")])
def test_dtype_conversion_of_fp32_inputs(gpt2, dtype, torch_dtype, name, tmp_path):
    inputs = [gpt2.base, gpt2.v1, gpt2.v2]
    out = surgery.soup(inputs, tmp_path / "soup", dtype=dtype, weights=[1, 1, 2])
    assert json.loads((out / "config.json").read_text())["dtype"] == name
    expected = expected_state(inputs, gpt2.auto, [0.25, 0.25, 0.5], out_dtype=torch_dtype)
    assert_loads_as(out, expected, gpt2.auto, gpt2.base)
    check_layout(out, 5_000_000_000)


def test_soup_of_one_input_is_a_copy(bert, tmp_path):
    out = surgery.soup([bert.v1], tmp_path / "copy")
    got, src = read_folder(out), read_folder(bert.v1)
    assert set(got) == set(src) and all(torch.equal(got[k], src[k]) for k in src)


def test_relative_paths(gpt2, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(gpt2.base, tmp_path / "models" / "a")
    shutil.copytree(gpt2.v1, tmp_path / "models" / "b")
    monkeypatch.chdir(tmp_path)
    out = surgery.soup(["models/a", "./models/b"], "out/soup")
    assert out == (tmp_path / "out" / "soup").resolve()
    a, b = read_folder(gpt2.base), read_folder(gpt2.v1)
    got = read_folder(out)
    for k in a:
        assert_close_ulp(got[k], soup_reference([a[k], b[k]], [0.5, 0.5], torch.float32), 1, k)
    record = json.loads((out / "surgery_recipe.json").read_text())
    assert [e["source"] for e in record["inputs"]] == ["models/a", "./models/b"]
    assert "base_model:" not in (out / "README.md").read_text()  # local folders are not Hub ids
