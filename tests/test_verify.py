"""``surgery verify``: shard hashes, index consistency, config, and ``--rerun`` reproducing the bytes
(or failing when an input changed), through the library and the CLI."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import surgery
from _support import data_start, weight_files


def cli(*args):
    from surgery_cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(autouse=True)
def content_hashes(monkeypatch):
    """These tests read the inputs' content hashes, which outputs record when asked to."""
    monkeypatch.setenv("SURGERY_CONTENT_HASH", "1")


@pytest.fixture
def soup_out(llama, tmp_path):
    inputs = [shutil.copytree(p, tmp_path / "in" / p.name) for p in (llama.base, llama.v1)]
    out = surgery.soup(inputs, tmp_path / "soup", max_shard_size=100_000)
    assert len(weight_files(out)) > 1
    return out, inputs


def flip_byte(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01
    path.write_bytes(bytes(raw))


def test_fresh_output_verifies(soup_out):
    out, _ = soup_out
    result = surgery.verify(out)
    assert result.ok, result.problems
    assert result.shards == len(weight_files(out)) and result.tensors > 0
    r = cli("verify", out)
    assert r.exit_code == 0 and r.output.startswith(f"OK {out}"), r.output


def test_flipped_byte_names_the_shard(soup_out):
    out, _ = soup_out
    shard = weight_files(out)[1]
    flip_byte(shard, data_start(shard) + 3)
    result = surgery.verify(out)
    assert not result.ok and len(result.problems) == 1
    assert shard.name in result.problems[0] and "sha256" in result.problems[0]
    r = cli("verify", out)
    assert r.exit_code == 1 and shard.name in r.output and "\n" == r.output[-1] and r.output.count("error:") == 1


def test_index_listing_a_missing_tensor(soup_out):
    out, _ = soup_out
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first_shard = weight_files(out)[0].name
    index["weight_map"]["model.layers.9.ghost.weight"] = first_shard
    index_path.write_text(json.dumps(index))
    r = cli("verify", out)
    assert r.exit_code == 1 and "model.layers.9.ghost.weight" in r.output and first_shard in r.output, r.output

    del index["weight_map"]["model.layers.9.ghost.weight"]
    dropped = sorted(index["weight_map"])[0]
    del index["weight_map"][dropped]
    index_path.write_text(json.dumps(index))
    problems = surgery.verify(out).problems
    assert any(dropped in p and "not in the index" in p for p in problems), problems


def test_missing_config_and_not_an_output(soup_out, tmp_path):
    out, _ = soup_out
    (out / "config.json").unlink()
    assert any("config.json" in p for p in surgery.verify(out).problems)
    r = cli("verify", tmp_path / "in")
    assert r.exit_code == 1 and "surgery_recipe.json" in r.output


def test_rerun_reproduces_the_bytes_and_catches_a_changed_input(soup_out, tmp_path):
    out, inputs = soup_out
    result = surgery.verify(out, rerun=True)
    assert result.ok and result.rerun and result.inputs_checked == 2, result.problems
    r = cli("verify", out, "--rerun")
    assert r.exit_code == 0 and "rerun gave the same bytes" in r.output, r.output

    moved = tmp_path / "moved"
    shutil.move(inputs[1], moved)
    r = cli("verify", out, "--rerun")
    assert r.exit_code == 1 and str(inputs[1]) in r.output and "--input" in r.output, r.output
    r = cli("verify", out, "--input", f"{inputs[1]}={moved}")
    assert r.exit_code == 0 and "rerun gave the same bytes" in r.output, r.output

    shard = weight_files(moved)[0]
    flip_byte(shard, data_start(shard) + 5)  # the input changed: its hash first, then the bytes differ
    r = cli("verify", out, "--input", f"{inputs[1]}={moved}")
    assert r.exit_code == 1 and "content sha256" in r.output and str(inputs[1]) in r.output, r.output
    assert "rerun gives different bytes" in r.output
    assert r.output.index("content sha256") < r.output.index("rerun gives different bytes")


def test_diff_transfer_and_merge_outputs_verify_and_rerun(llama, tmp_path):
    delta = surgery.diff(llama.v1, llama.base, tmp_path / "delta")
    assert surgery.verify(delta, rerun=True).ok  # a task-vector folder has no config, and needs none
    moved = surgery.transfer(llama.v2, tmp_path / "moved", diff=delta)
    result = surgery.verify(moved, rerun=True)
    assert result.ok and result.inputs_checked == 2, result.problems
    merged = surgery.merge(llama.base, [llama.v1, llama.v2], tmp_path / "ties", method="ties", density=0.5)
    result = surgery.verify(merged, rerun=True)
    assert result.ok and result.inputs_checked == 3, result.problems


def test_without_content_hashes(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SURGERY_CONTENT_HASH", "0")
    out = surgery.soup([llama.base, llama.v1], tmp_path / "soup")
    record = json.loads((out / "surgery_recipe.json").read_text())
    assert all("content_sha256" not in e for e in record["inputs"]) and record["outputs"]
    result = surgery.verify(out, rerun=True)
    assert result.ok and result.inputs_checked == 0
