"""Fine-tuning transfer, ``target + scale * (ft - base)``, and the saved diff it can start from.

Every expected value is a float64 reference computed here from tensors read back with safetensors;
outputs must be within one ulp of it in the output dtype.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tv_support import (AUTO, FT_MAX_LENGTH, FT_TEMPLATE, NEW_TOKENS, assert_no_output, assert_ulp, content_hash,
                        file_dtypes, load_state, read_tensors, tied_state)


def transfer_reference(target: Path, base: Path, ft: Path, scale: float, out_dtype: torch.dtype,
                       names) -> dict[str, torch.Tensor]:
    """target + scale * (ft - base) in float64 for each float tensor, cast once to ``out_dtype``."""
    t, b, f = tied_state(target), tied_state(base), tied_state(ft)
    out = {}
    for n in names:
        if t[n].is_floating_point():
            out[n] = (t[n].double() + scale * (f[n].double() - b[n].double())).to(out_dtype)
        else:
            out[n] = t[n]
    return out


def assert_transferred(out: Path, target: Path, base: Path, ft: Path, scale: float, out_dtype: torch.dtype,
                       auto: str):
    got = read_tensors(out)
    assert set(got) == set(read_tensors(target)), "the output is laid out like the target"
    expected = transfer_reference(target, base, ft, scale, out_dtype, got)
    for n, v in got.items():
        assert_ulp(v, expected[n], 1, n)
    # and transformers loads it as it loads the target: nothing missing or left over
    state, info, _ = load_state(out, auto, cache=False)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    full = transfer_reference(target, base, ft, scale, out_dtype, tied_state(out))
    for n, v in tied_state(out).items():
        assert_ulp(state[n].to(out_dtype), full[n], 1, f"loaded {n}")


# (family, --dtype, output dtype) : Llama is untied, GPT-2 ties its head to wte
CASES = [("llama", None, torch.float32), ("llama-bf16", None, torch.bfloat16), ("llama", "bf16", torch.bfloat16),
         ("gpt2", None, torch.float32), ("gpt2", "bf16", torch.bfloat16)]


@pytest.mark.parametrize("route", ["diff", "one-pass"])
@pytest.mark.parametrize("fam,dtype,out_dtype", CASES, ids=[f"{c[0]}-{c[1] or 'asis'}" for c in CASES])
def test_transfer_matches_float64_reference(zoo, cli, tmp_path, fam, dtype, out_dtype, route):
    base, ft, target = zoo[f"{fam}/base"], zoo[f"{fam}/ft1"], zoo[f"{fam}/target"]
    scale = 0.75
    out = tmp_path / "out"
    extra = ["--dtype", dtype] if dtype else []
    if route == "diff":
        delta = tmp_path / "delta"
        cli("diff", ft, base, "-o", delta)
        cli("transfer", "--to", target, "--diff", delta, "-o", out, "--scale", scale, *extra)
    else:
        cli("transfer", "--to", target, "--source-base", base, "--source-ft", ft, "-o", out, "--scale", scale, *extra)
    assert set(file_dtypes(out).values()) == {"F32" if out_dtype == torch.float32 else "BF16"}
    config = json.loads((out / "config.json").read_text())
    target_config = json.loads((target / "config.json").read_text())
    assert config["dtype"] == {torch.float32: "float32", torch.bfloat16: "bfloat16"}[out_dtype]
    assert {k: v for k, v in config.items() if k != "dtype"} == {k: v for k, v in target_config.items() if k != "dtype"}
    assert_transferred(out, target, base, ft, scale, out_dtype, AUTO[fam.split("-")[0]])


def test_transfer_scale_one_library(zoo, tmp_path):
    """The library call, scale 1: on bf16 inputs the result is target + (ft - base) within one bf16 ulp."""
    import surgery

    base, ft, target = zoo["llama-bf16/base"], zoo["llama-bf16/ft1"], zoo["llama-bf16/target"]
    out = surgery.transfer(target, tmp_path / "out", source_base=base, source_ft=ft)
    assert Path(out) == (tmp_path / "out").resolve()
    assert_transferred(out, target, base, ft, 1.0, torch.bfloat16, "AutoModelForCausalLM")


def test_transfer_scale_zero_is_the_target(zoo, tmp_path):
    import surgery

    target = zoo["llama/target"]
    out = surgery.transfer(target, tmp_path / "out", source_base=zoo["llama/base"], source_ft=zoo["llama/ft1"],
                           scale=0.0)
    got, want = read_tensors(out), read_tensors(target)
    assert set(got) == set(want)
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_transfer_untied_fine_tune_onto_tied_target(zoo, tmp_path):
    """Qwen2: base and target tie lm_head to the embedding, the fine-tune stores its own head. The
    output stores lm_head = target_embed + scale * (ft_head - base_embed) and unties it in the config."""
    import surgery

    base, ft, target = zoo["qwen2/base"], zoo["qwen2/ft-untied"], zoo["qwen2/target"]
    assert "lm_head.weight" not in read_tensors(target) and "lm_head.weight" in read_tensors(ft)
    out = surgery.transfer(target, tmp_path / "out", source_base=base, source_ft=ft, scale=0.5, dtype="bf16")
    got = read_tensors(out)
    assert set(got) == set(read_tensors(target)) | {"lm_head.weight"}
    expected = transfer_reference(target, base, ft, 0.5, torch.bfloat16, got)
    for n, v in got.items():
        assert_ulp(v, expected[n], 1, n)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    state, info, _ = load_state(out, "AutoModelForCausalLM", cache=False)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert torch.equal(state["lm_head.weight"], got["lm_head.weight"])
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])


def test_transfer_tied_fine_tune_from_untied_base(zoo, tmp_path):
    """Qwen2 the other way round: the base stores its own lm_head, the fine-tune ties its head to its
    embedding. The fine-tune's head moved by ft_embed - base_head, and that is what the untied target's
    head must receive (not the embedding's difference, ft_embed - base_embed)."""
    import surgery

    base, ft, target = zoo["qwen2/ft-untied"], zoo["qwen2/ft1"], zoo["qwen2/target-untied"]
    assert "lm_head.weight" in read_tensors(base) and "lm_head.weight" not in read_tensors(ft)
    assert "lm_head.weight" in read_tensors(target)
    out = surgery.transfer(target, tmp_path / "out", source_base=base, source_ft=ft, dtype="bf16")
    got = read_tensors(out)
    assert set(got) == set(read_tensors(target))
    expected = transfer_reference(target, base, ft, 1.0, torch.bfloat16, got)
    for n, v in got.items():
        assert_ulp(v, expected[n], 1, n)


# ---------------------------------------------------------------------------------------------
# A fine-tune that grew the vocabulary


@pytest.mark.parametrize("scale", [1.0, 0.5])
@pytest.mark.parametrize("route", ["diff", "one-pass"])
@pytest.mark.parametrize("fam", ["llama", "gpt2"])
def test_transfer_grown_vocabulary(zoo, cli, tmp_path, fam, route, scale):
    """The fine-tune has 8 more tokens (embedding and head rows, config vocab_size, tokenizer). The new
    rows are the fine-tune's exactly; the old rows are transferred; tokenizer files are the fine-tune's."""
    # bfloat16 inputs: the arithmetic on the old rows is exact in float32, so only the vocabulary is tested here
    base, ft, target = zoo[f"{fam}-bf16/base"], zoo[f"{fam}-bf16/ft-vocab"], zoo[f"{fam}-bf16/target"]
    out = tmp_path / "out"
    if route == "diff":
        delta = tmp_path / "delta"
        cli("diff", ft, base, "-o", delta)
        cli("transfer", "--to", target, "--diff", delta, "-o", out, "--scale", scale)
    else:
        cli("transfer", "--to", target, "--source-base", base, "--source-ft", ft, "-o", out, "--scale", scale)
    got, t, b, f = read_tensors(out), tied_state(target), tied_state(base), tied_state(ft)
    assert set(got) == set(read_tensors(target))
    vocab_tensors = {"llama": ["model.embed_tokens.weight", "lm_head.weight"], "gpt2": ["transformer.wte.weight"]}[fam]
    for n, v in got.items():
        if n in vocab_tensors:
            assert v.shape == f[n].shape == (72, 32), n
            old = (t[n].double() + scale * (f[n][:64].double() - b[n].double())).to(torch.bfloat16)
            assert_ulp(v[:64], old, 1, f"{n} rows 0..63")
            new_rows_exact = torch.equal(v[64:], f[n][64:])
            scaled = torch.equal(v[64:], (scale * f[n][64:].double()).to(v.dtype))
            assert new_rows_exact, (f"{n}: the 8 new tokens' rows must be the fine-tune's exactly"
                                    f"{' (they are scale * the fine-tune rows)' if scaled else ''}")
        else:
            assert v.shape == t[n].shape
            assert_ulp(v, (t[n].double() + scale * (f[n].double() - b[n].double())).to(torch.bfloat16), 1, n)
    config = json.loads((out / "config.json").read_text())
    target_config = json.loads((target / "config.json").read_text())
    assert config["vocab_size"] == 72
    assert {k: v for k, v in config.items() if k != "vocab_size"} == \
        {k: v for k, v in target_config.items() if k != "vocab_size"}
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (target / name).read_bytes() != (ft / name).read_bytes()  # the test can tell them apart
        assert (out / name).read_bytes() == (ft / name).read_bytes(), f"{name} is not the fine-tune's"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 72 and tok.convert_tokens_to_ids(NEW_TOKENS[-1]) == 71
    assert tok.chat_template == FT_TEMPLATE and tok.model_max_length == FT_MAX_LENGTH
    state, info, cfg = load_state(out, AUTO[fam], cache=False)
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["unexpected_keys"]
    assert cfg["vocab_size"] == 72
    assert torch.equal(state[vocab_tensors[0]], got[vocab_tensors[0]])


def test_tokenizer_files_are_exactly_the_fine_tunes(zoo, tmp_path):
    """The target has a chat template the fine-tune lacks: the output's tokenizer and chat template are
    the fine-tune's (here: none), not a mix of the fine-tune's tokenizer and the target's template."""
    import surgery

    ft = shutil.copytree(zoo["llama/ft-vocab"], tmp_path / "ft-no-template")
    (ft / "chat_template.jinja").unlink()
    target = zoo["llama/target"]
    assert (target / "chat_template.jinja").exists()
    out = surgery.transfer(target, tmp_path / "out", source_base=zoo["llama/base"], source_ft=ft)
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"}
    assert {p.name for p in Path(out).iterdir()} & tokenizer_files == {p.name for p in ft.iterdir()} & tokenizer_files
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template is None


# ---------------------------------------------------------------------------------------------
# Refusals: every offending tensor named, no output left behind


def _problems_named(err, names):
    text = str(err)
    for n in names:
        assert repr(n) in text or n in text, f"{n} not named in: {text}"


NARROW = [f"model.layers.{i}.mlp.{p}_proj.weight" for i in range(2) for p in ("gate", "up", "down")]


@pytest.mark.parametrize("route", ["diff", "one-pass"])
def test_shape_mismatch_lists_every_tensor(zoo, cli, tmp_path, route):
    """A target with intermediate_size 48 instead of 64: each of the six MLP weights is named."""
    from surgery.errors import IncompatibleInputsError
    import surgery

    base, ft, target = zoo["llama/base"], zoo["llama/ft1"], zoo["llama/target-narrow"]
    out = tmp_path / "out"
    kw = {"source_base": base, "source_ft": ft}
    args = ["--source-base", base, "--source-ft", ft]
    if route == "diff":
        delta = tmp_path / "delta"
        surgery.diff(ft, base, delta)
        kw, args = {"diff": delta}, ["--diff", delta]
    with pytest.raises(IncompatibleInputsError) as e:
        surgery.transfer(target, out, **kw)
    offending = {n for n in NARROW if any(repr(n) in p for p in e.value.problems)}
    assert offending == set(NARROW)
    assert len(e.value.problems) == len(NARROW), e.value.problems
    assert_no_output(out)
    for keep in ([], ["--keep-target"]):
        r = cli("transfer", "--to", target, *args, "-o", out, *keep, ok=False)
        _problems_named(r.output, NARROW)
        assert_no_output(out)


BIASES = [f"model.layers.{i}.self_attn.{p}_proj.bias" for i in range(2) for p in ("q", "k", "v", "o")]


@pytest.mark.parametrize("route", ["diff", "one-pass"])
def test_target_only_tensors_error_or_kept(zoo, cli, tmp_path, route):
    """The target has attention biases the task vector lacks: an error naming each, or with
    --keep-target the target's biases copied and everything else transferred."""
    base, ft, target = zoo["llama-bf16/base"], zoo["llama-bf16/ft1"], zoo["llama-bf16/target-bias"]
    out = tmp_path / "out"
    args = ["--source-base", base, "--source-ft", ft]
    if route == "diff":
        cli("diff", ft, base, "-o", tmp_path / "delta")
        args = ["--diff", tmp_path / "delta"]
    r = cli("transfer", "--to", target, *args, "-o", out, ok=False)
    _problems_named(r.output, BIASES)
    assert_no_output(out)
    cli("transfer", "--to", target, *args, "-o", out, "--keep-target", "--scale", 0.5)
    got, t = read_tensors(out), read_tensors(target)
    assert set(got) == set(t)
    expected = transfer_reference(target, base, ft, 0.5, torch.bfloat16, [n for n in got if n not in BIASES])
    for n, v in got.items():
        if n in BIASES:
            assert torch.equal(v, t[n]), f"{n} is not the target's"
        else:
            assert_ulp(v, expected[n], 1, n)


def test_vector_only_tensors_are_an_error_even_with_keep_target(zoo, cli, tmp_path):
    """The fine-tune pair has attention biases the target lacks: always an error naming each."""
    base, ft, target = zoo["llama/base-bias"], zoo["llama/ft-bias"], zoo["llama/base"]
    out = tmp_path / "out"
    for keep in ([], ["--keep-target"]):
        r = cli("transfer", "--to", target, "--source-base", base, "--source-ft", ft, "-o", out, *keep, ok=False)
        _problems_named(r.output, BIASES)
        assert_no_output(out)


def test_diff_between_mismatched_checkpoints_is_an_error(zoo, cli, tmp_path):
    out = tmp_path / "delta"
    r = cli("diff", zoo["llama/target-narrow"], zoo["llama/base"], "-o", out, ok=False)
    _problems_named(r.output, NARROW)
    assert_no_output(out)
    r = cli("diff", zoo["llama/ft-bias"], zoo["llama/base"], "-o", out, ok=False)
    _problems_named(r.output, BIASES)
    assert_no_output(out)


def test_transfer_needs_exactly_one_source(zoo, cli, tmp_path):
    out = tmp_path / "out"
    target, base, ft = zoo["llama/target"], zoo["llama/base"], zoo["llama/ft1"]
    cli("transfer", "--to", target, "-o", out, ok=False)
    cli("transfer", "--to", target, "--source-base", base, "-o", out, ok=False)
    surgery_delta = tmp_path / "delta"
    cli("diff", ft, base, "-o", surgery_delta)
    cli("transfer", "--to", target, "--diff", surgery_delta, "--source-base", base, "--source-ft", ft, "-o", out,
        ok=False)
    assert_no_output(out)
    r = cli("transfer", "--to", target, "--diff", ft, "-o", out, ok=False)  # not a saved diff
    assert "surgery_delta.json" in r.output
    assert_no_output(out)


# ---------------------------------------------------------------------------------------------
# The saved diff


@pytest.mark.parametrize("fam", ["llama", "llama-bf16", "gpt2"])
def test_diff_values_and_manifest(zoo, cli, tmp_path, fam):
    """The delta holds ft - base exactly (stored one precision up: float32 for bf16 inputs, float64 for
    float32 inputs); the manifest names both sources with content hashes computed here from the bytes."""
    base, ft = zoo[f"{fam}/base"], zoo[f"{fam}/ft1"]
    out = tmp_path / "delta"
    cli("diff", ft, base, "-o", out)
    got, f, b = read_tensors(out), read_tensors(ft), read_tensors(base)
    assert set(got) == set(f)
    for n, v in got.items():
        stored = torch.float32 if f[n].dtype == torch.bfloat16 else torch.float64
        assert v.dtype == stored, n
        assert torch.equal(v, (f[n].double() - b[n].double()).to(stored)), n
    manifest = json.loads((out / "surgery_delta.json").read_text())
    assert manifest["ft"]["source"] == str(ft) and manifest["base"]["source"] == str(base)
    assert manifest["ft"]["content_sha256"] == content_hash(ft)
    assert manifest["base"]["content_sha256"] == content_hash(base)
    assert manifest["ft"]["content_sha256"] != manifest["base"]["content_sha256"]
    # the fine-tune's config and tokenizer travel with it
    for p in ft.iterdir():
        if p.name.endswith(".json") and "safetensors" not in p.name:
            assert (out / "ft_files" / p.name).read_bytes() == p.read_bytes(), p.name


def test_content_hash_does_not_depend_on_sharding(zoo, tmp_path):
    import surgery

    single, sharded, ft = zoo["llama/base"], zoo["llama/base-sharded"], zoo["llama/ft1"]
    assert len(list(sharded.glob("*.safetensors"))) >= 3
    assert content_hash(single) == content_hash(sharded)
    surgery.diff(ft, single, tmp_path / "d1")
    surgery.diff(ft, sharded, tmp_path / "d2", max_shard_size="20KB")
    m1 = json.loads((tmp_path / "d1" / "surgery_delta.json").read_text())
    m2 = json.loads((tmp_path / "d2" / "surgery_delta.json").read_text())
    assert m1["base"]["content_sha256"] == m2["base"]["content_sha256"] == content_hash(single)
    assert m1["base"]["source"] == str(single) and m2["base"]["source"] == str(sharded)
    assert read_tensors(tmp_path / "d1").keys() == read_tensors(tmp_path / "d2").keys()
    for n, v in read_tensors(tmp_path / "d1").items():
        assert torch.equal(v, read_tensors(tmp_path / "d2")[n])


def test_content_hash_of_tied_checkpoint(zoo, tmp_path):
    """GPT-2 stores no lm_head: the hash covers the stored tensors only."""
    import surgery

    surgery.diff(zoo["gpt2/ft1"], zoo["gpt2/base"], tmp_path / "d")
    m = json.loads((tmp_path / "d" / "surgery_delta.json").read_text())
    assert m["base"]["content_sha256"] == content_hash(zoo["gpt2/base"])
    assert m["ft"]["content_sha256"] == content_hash(zoo["gpt2/ft1"])


@pytest.mark.parametrize("dtype,code", [("bf16", "BF16"), ("fp16", "F16"), ("fp32", "F32"), ("fp64", "F64")])
def test_diff_storage_dtype(zoo, cli, tmp_path, dtype, code):
    base, ft = zoo["llama/base"], zoo["llama/ft1"]
    out = tmp_path / "delta"
    cli("diff", ft, base, "-o", out, "--dtype", dtype)
    assert set(file_dtypes(out).values()) == {code}
    torch_dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}[code]
    f, b = read_tensors(ft), read_tensors(base)
    for n, v in read_tensors(out).items():
        assert_ulp(v, (f[n].double() - b[n].double()).to(torch_dtype), 0 if code in ("F32", "F64") else 1, n)
    assert json.loads((out / "surgery_delta.json").read_text())["dtype"] == code


def test_diff_of_bf16_defaults_to_float32_and_transfers_exactly(zoo, tmp_path):
    """bf16 inputs: the default delta is float32 (lossless), and scale-1 transfer of it onto its own base
    reproduces the fine-tune bit for bit."""
    import surgery

    base, ft = zoo["llama-bf16/base"], zoo["llama-bf16/ft1"]
    surgery.diff(ft, base, tmp_path / "delta")
    assert set(file_dtypes(tmp_path / "delta").values()) == {"F32"}
    out = surgery.transfer(base, tmp_path / "out", diff=tmp_path / "delta")
    got, f = read_tensors(out), read_tensors(ft)
    for n in f:
        assert got[n].dtype == torch.bfloat16 and torch.equal(got[n], f[n]), n


def test_diff_output_refusals(zoo, cli, tmp_path):
    base, ft = zoo["llama/base"], zoo["llama/ft1"]
    out = tmp_path / "delta"
    cli("diff", ft, base, "-o", out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    r = cli("diff", ft, base, "-o", out, ok=False)  # exists, no --force
    assert "exists" in r.output
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    cli("diff", ft, base, "-o", out, "--force", "--dtype", "bf16")
    assert set(file_dtypes(out).values()) == {"BF16"}
    r = cli("diff", ft, base, "-o", tmp_path / "d2", "--dtype", "int8", ok=False)
    assert_no_output(tmp_path / "d2")
