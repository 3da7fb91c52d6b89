"""The ``surgery`` command through typer's runner (and once as the installed script)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import surgery
from surgery_cli.app import app
from _support import assert_close_ulp, check_layout, file_dtypes, load_model_state, read_folder, soup_reference

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def test_help():
    r = invoke("--help")
    assert r.exit_code == 0
    assert "soup" in r.stdout and "inspect" in r.stdout
    r = invoke()
    assert "Usage" in r.output  # no arguments: help, not a traceback


def test_soup_help():
    r = invoke("soup", "--help")
    assert r.exit_code == 0
    for opt in ("--output", "--weights", "--no-normalize", "--greedy", "--score-cmd", "--dtype", "--device",
                "--max-shard-size", "--config-from", "--force", "--allow-pickle", "--quiet"):
        assert opt in r.stdout, opt


def test_inspect_help():
    r = invoke("inspect", "--help")
    assert r.exit_code == 0
    for opt in ("--summary", "--headers-only", "--json", "--allow-pickle"):
        assert opt in r.stdout, opt


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout.strip() == surgery.__version__


def test_installed_script_runs():
    script = Path(sys.executable).parent / "surgery"
    assert script.exists()
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "soup" in proc.stdout


def _expected(inputs, weights, out_dtype=None):
    files = [read_folder(p) for p in inputs]
    return {k: soup_reference([f[k] for f in files], weights, out_dtype or v.dtype) if v.is_floating_point()
            else v for k, v in files[0].items()}


@pytest.mark.parametrize("args,weights", [
    ([], [1 / 3] * 3),
    (["--weights", "2,1,1"], [0.5, 0.25, 0.25]),
    (["--weights", "1, 1, -0.5", "--no-normalize"], [1.0, 1.0, -0.5]),
], ids=["uniform", "weighted", "no-normalize"])
def test_cli_soup(llama, args, weights, tmp_path):
    out = tmp_path / "soup"
    inputs = [llama.base, llama.v1, llama.v2]
    r = invoke("soup", *inputs, "-o", out, "--max-shard-size", "100KB", "--device", "cpu", *args)
    assert r.exit_code == 0, r.output
    assert f"wrote {out.resolve()}" in r.stdout
    got = read_folder(out)
    for k, v in _expected(inputs, weights).items():
        assert_close_ulp(got[k], v, 1, k)
    check_layout(out, 100_000)
    assert json.loads((out / "surgery_recipe.json").read_text())["recipe"]["weights"] == pytest.approx(weights)
    state, info, _ = load_model_state(out, llama.auto, cache=False)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_cli_soup_dtype_and_config_from(llama, tmp_path):
    out = tmp_path / "soup"
    inputs = [llama.bf16a, llama.bf16b]
    r = invoke("soup", *inputs, "-o", out, "--dtype", "fp32", "--config-from", llama.bf16b, "-q")
    assert r.exit_code == 0, r.output
    assert file_dtypes(out) == {"F32"}
    got = read_folder(out)
    for k, v in _expected(inputs, [0.5, 0.5], torch.float32).items():
        assert_close_ulp(got[k], v, 0, k)
    config = json.loads((out / "config.json").read_text())
    assert config["surgery_fixture"] == "llama-bf16b" and config["dtype"] == "float32"
    assert (out / "generation_config.json").read_bytes() == (llama.bf16b / "generation_config.json").read_bytes()


def test_cli_soup_tied_and_untied(qwen2, tmp_path):
    out = tmp_path / "soup"
    r = invoke("soup", qwen2.base, qwen2.untied, "-o", out, "-q")
    assert r.exit_code == 0, r.output
    t, u = read_folder(qwen2.base), read_folder(qwen2.untied)
    got = read_folder(out)
    assert_close_ulp(got["lm_head.weight"], soup_reference(
        [t["model.embed_tokens.weight"], u["lm_head.weight"]], [0.5, 0.5], torch.float32), 1)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_cli_inspect_json(gpt2):
    r = invoke("inspect", gpt2.base, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    files = read_folder(gpt2.base)
    assert data["checkpoints"][0]["tensors"] == len(files)
    assert data["checkpoints"][0]["parameters"] == sum(t.numel() for t in files.values())
    assert {t[0]: t[2] for t in data["tensors"]} == {k: list(v.shape) for k, v in files.items()}
    assert data["comparison"] is None


def test_cli_unknown_device(gpt2, tmp_path):
    r = invoke("soup", gpt2.base, gpt2.v1, "-o", tmp_path / "o", "--device", "cuda:0")
    if torch.cuda.is_available():
        pytest.skip("CUDA present")  # pragma: no cover
    assert r.exit_code != 0 and "CUDA is not available" in r.stderr
    assert not (tmp_path / "o").exists()
