"""Every refusal exits non-zero with a message naming the file and tensor, and leaves nothing behind.

Each case is run twice: through the CLI (``typer.testing.CliRunner``) and through the library,
where it must raise the matching ``surgery.errors`` type.
"""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import surgery
from surgery import errors
from surgery_cli.app import app
from _support import (assert_close_ulp, assert_no_output, copy_checkpoint, read_folder, soup_reference,
                      write_st)

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def _pair(tmp_path, a: dict, b: dict):
    pa = write_st(tmp_path / "a" / "model.safetensors", a).parent
    pb = write_st(tmp_path / "b" / "model.safetensors", b).parent
    return pa, pb


def case_missing_tensor(tmp_path, fams):
    a, b = _pair(tmp_path, {"w": torch.ones(2), "extra.bias": torch.ones(3)}, {"w": torch.zeros(2)})
    return [a, b], errors.IncompatibleInputsError, ["'extra.bias'", str(b), "missing"]


def case_extra_tensor(tmp_path, fams):
    a, b = _pair(tmp_path, {"w": torch.ones(2)}, {"w": torch.zeros(2), "surprise": torch.ones(1)})
    return [a, b], errors.IncompatibleInputsError, ["'surprise'", str(b)]


def case_shape_mismatch(tmp_path, fams):
    a, b = _pair(tmp_path, {"w": torch.ones(4, 4), "v": torch.ones(2)}, {"w": torch.ones(4, 5), "v": torch.ones(2)})
    return [a, b], errors.IncompatibleInputsError, ["'w'", "[4, 5]", "[4, 4]", str(b / "model.safetensors")]


def case_kind_mismatch(tmp_path, fams):
    a, b = _pair(tmp_path, {"ids": torch.arange(3)}, {"ids": torch.arange(3.0)})
    return [a, b], errors.IncompatibleInputsError, ["'ids'", "I64", "F32"]


def case_real_models_of_different_architectures(tmp_path, fams):
    a, b = fams["gpt2"].base, fams["qwen2"].base
    n = len(read_folder(a)) + len(read_folder(b))  # no name in common: each is one problem
    return [a, b], errors.IncompatibleInputsError, \
        ["'model.embed_tokens.weight'", str(a), str(b), f"{n} incompatibilities",
         f"and {n - 12} more"]


def case_corrupt_header(tmp_path, fams):
    a, _ = _pair(tmp_path, {"w": torch.ones(2)}, {"w": torch.ones(2)})
    bad = tmp_path / "b" / "model.safetensors"
    data = bytearray(bad.read_bytes())
    data[8:20] = b"#garbage!!#!"  # inside the JSON header
    bad.write_bytes(bytes(data))
    return [a, bad.parent], errors.CheckpointError, [str(bad), "corrupt"]


def case_truncated_shard(tmp_path, fams):
    ckpt = copy_checkpoint(fams["llama"].v1, tmp_path / "trunc")
    shard = sorted(ckpt.glob("model-*.safetensors"))[2]
    with safe_open(str(shard), "pt") as f:
        names = list(f.keys())
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 1000)
    return [fams["llama"].base, ckpt], errors.CheckpointError, \
        ["truncated", str(shard.resolve()), ("any", [repr(n) for n in names])]


def case_pickle_without_allow(tmp_path, fams):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save(read_folder(fams["gpt2"].v1), folder / "pytorch_model.bin")
    (folder / "config.json").write_bytes((fams["gpt2"].v1 / "config.json").read_bytes())
    return [fams["gpt2"].base, folder], errors.PickleRefusedError, [str(folder / "pytorch_model.bin"), "--allow-pickle"]


def case_missing_input(tmp_path, fams):
    return [fams["gpt2"].base, tmp_path / "nope"], errors.CheckpointError, [str(tmp_path / "nope"), "no such file"]


def case_bad_weights(tmp_path, fams):
    return [fams["gpt2"].base, fams["gpt2"].v1], errors.PlanError, ["3 weights", "2 inputs"]


CASES = {f.__name__[5:]: f for f in [case_missing_tensor, case_extra_tensor, case_shape_mismatch, case_kind_mismatch,
                                     case_real_models_of_different_architectures, case_corrupt_header,
                                     case_truncated_shard, case_pickle_without_allow, case_missing_input,
                                     case_bad_weights]}


@pytest.fixture
def fams(llama, qwen2, gpt2):
    return {"llama": llama, "qwen2": qwen2, "gpt2": gpt2}


def _check_message(msg: str, needles):
    for n in needles:
        if isinstance(n, tuple):
            assert any(x in msg for x in n[1]), f"none of {n[1][:3]}... in {msg!r}"
        else:
            assert n in msg, f"{n!r} not in {msg!r}"


@pytest.mark.parametrize("case", list(CASES))
def test_cli_refuses(case, fams, tmp_path):
    inputs, _, needles = CASES[case](tmp_path, fams)
    out = tmp_path / "out" / "soup"
    extra = ["--weights", "1,2,3"] if case == "bad_weights" else []
    result = cli("soup", *inputs, "-o", out, "-q", *extra)
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    msg = result.stderr
    assert msg.startswith("error: ") and msg.count("\n") == 1, msg  # one line
    _check_message(msg, needles)
    assert_no_output(out)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("case", list(CASES))
def test_library_refuses(case, fams, tmp_path):
    inputs, exc, needles = CASES[case](tmp_path, fams)
    out = tmp_path / "soup"
    kw = {"weights": [1, 2, 3]} if case == "bad_weights" else {}
    with pytest.raises(exc) as e:
        surgery.soup(inputs, out, **kw)
    assert isinstance(e.value, errors.SurgeryError)
    _check_message(str(e.value), needles)
    assert_no_output(out)


def test_incompatibilities_are_all_listed(tmp_path):
    a, b = _pair(tmp_path, {"p": torch.ones(2), "q": torch.ones(3), "r": torch.ones(1)},
                 {"p": torch.ones(5), "r": torch.ones(1), "s": torch.ones(1)})
    with pytest.raises(errors.IncompatibleInputsError) as e:
        surgery.soup([a, b], tmp_path / "o")
    assert len(e.value.problems) == 3
    msg = str(e.value)
    assert "'p'" in msg and "'q'" in msg and "'s'" in msg and msg.startswith("3 incompatibilities")


def test_pickle_accepted_with_allow_pickle(gpt2, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    torch.save(read_folder(gpt2.v1), folder / "pytorch_model.bin")
    (folder / "config.json").write_bytes((gpt2.v1 / "config.json").read_bytes())
    out = tmp_path / "soup"
    result = cli("soup", gpt2.base, folder, "-o", out, "--allow-pickle", "-q")
    assert result.exit_code == 0, result.output
    a, b = read_folder(gpt2.base), read_folder(gpt2.v1)
    got = read_folder(out)
    assert set(got) == set(a)
    for k in a:
        assert_close_ulp(got[k], soup_reference([a[k], b[k]], [0.5, 0.5], torch.float32), 1, k)
    # the library too, with the pickled input first (its folder's config is used)
    out2 = surgery.soup([folder, gpt2.base], tmp_path / "soup2", allow_pickle=True)
    got2 = read_folder(out2)
    for k in a:
        assert_close_ulp(got2[k], soup_reference([b[k], a[k]], [0.5, 0.5], torch.float32), 1, k)


def test_existing_output_needs_force(gpt2, tmp_path):
    out = tmp_path / "soup"
    out.mkdir()
    (out / "keep-me.txt").write_text("old")
    result = cli("soup", gpt2.base, gpt2.v1, "-o", out, "-q")
    assert result.exit_code != 0
    assert "already exists" in result.stderr and str(out) in result.stderr and "--force" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep-me.txt"]
    with pytest.raises(errors.OutputError):
        surgery.soup([gpt2.base, gpt2.v1], out)
    assert [p.name for p in out.iterdir()] == ["keep-me.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".soup.")]

    result = cli("soup", gpt2.base, gpt2.v1, "-o", out, "-q", "--force")
    assert result.exit_code == 0, result.output
    assert not (out / "keep-me.txt").exists()
    a, b = read_folder(gpt2.base), read_folder(gpt2.v1)
    got = read_folder(out)
    for k in a:
        assert_close_ulp(got[k], soup_reference([a[k], b[k]], [0.5, 0.5], torch.float32), 1, k)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".soup.")], "old output left aside"
    # and the library with force=True replaces it again
    surgery.soup([gpt2.base, gpt2.v1], out, weights=[1, 3], force=True)
    got = read_folder(out)
    k = "transformer.wte.weight"
    assert_close_ulp(got[k], soup_reference([a[k], b[k]], [0.25, 0.75], torch.float32), 1, k)


def test_existing_file_as_output(gpt2, tmp_path):
    out = tmp_path / "a-file"
    out.write_text("x")
    result = cli("soup", gpt2.base, gpt2.v1, "-o", out, "-q", "--force")
    assert result.exit_code != 0 and "not a folder" in result.stderr
    assert out.read_text() == "x"


@pytest.mark.parametrize("which", ["equal", "parent", "equal_via_other_spelling"])
def test_output_that_is_an_input(gpt2, tmp_path, which):
    a = copy_checkpoint(gpt2.base, tmp_path / "models" / "a")
    b = copy_checkpoint(gpt2.v1, tmp_path / "models" / "b")
    before = {p.name: p.read_bytes() for p in b.iterdir()}
    out = {"equal": b, "parent": tmp_path / "models",
           "equal_via_other_spelling": tmp_path / "models" / "a" / ".." / "b"}[which]
    for force in ([], ["--force"]):
        result = cli("soup", a, b, "-o", out, "-q", *force)
        assert result.exit_code != 0
        assert "is, or contains, the input" in result.stderr
        assert str(b) in result.stderr or (which == "parent" and str(a) in result.stderr)
        with pytest.raises(errors.OutputError):
            surgery.soup([a, b], out, force=bool(force))
    assert {p.name: p.read_bytes() for p in b.iterdir()} == before
    assert not [p.name for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failure_mid_write_leaves_nothing(gpt2, tmp_path):
    """An input that shrinks after it was opened fails the run part-way through the writing; the
    partial output is removed."""
    victim = copy_checkpoint(gpt2.v1, tmp_path / "victim")
    ckpts = [surgery.open_checkpoint(gpt2.base), surgery.open_checkpoint(victim)]
    last = max(ckpts[1].tensors.values(), key=lambda t: t.end)
    with open(last.file, "r+b") as f:
        f.truncate(last.begin + 8)
    seen = []
    out = tmp_path / "soup"
    with pytest.raises(errors.CheckpointError) as e:
        surgery.soup(ckpts, out, progress=seen.append, device="cpu")
    assert repr(last.name) in str(e.value) and last.file in str(e.value)
    assert seen, "the failure came after some tensors were written"
    assert_no_output(out)


def test_bad_dtype_and_size(gpt2, tmp_path):
    out = tmp_path / "o"
    r = cli("soup", gpt2.base, gpt2.v1, "-o", out, "--dtype", "int4")
    assert r.exit_code != 0 and "unknown dtype 'int4'" in r.stderr
    r = cli("soup", gpt2.base, gpt2.v1, "-o", out, "--max-shard-size", "lots")
    assert r.exit_code != 0 and "cannot parse size 'lots'" in r.stderr
    r = cli("soup", gpt2.base, gpt2.v1, "-o", out, "--weights", "1,x")
    assert r.exit_code != 0 and "--weights" in r.stderr
    r = cli("soup", gpt2.base, gpt2.v1, "-o", out, "--weights", "1,-1")
    assert r.exit_code != 0 and "--no-normalize" in r.stderr
    with pytest.raises(errors.PlanError):
        surgery.soup([gpt2.base, gpt2.v1], out, weights=[1, float("nan")])
    with pytest.raises(errors.PlanError):
        surgery.soup(str(gpt2.base), out)  # a single path, not a list
    with pytest.raises(errors.PlanError):
        surgery.soup([], out)
    assert_no_output(out)


def test_config_from_unknown(gpt2, tmp_path):
    out = tmp_path / "o"
    r = cli("soup", gpt2.base, gpt2.v1, "-o", out, "--config-from", tmp_path / "absent")
    assert r.exit_code != 0 and "--config-from" in r.stderr
    assert_no_output(out)
