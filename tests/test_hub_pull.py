"""Hub inputs through the real ``huggingface_hub`` client against a loopback Hub (tests/hub_server.py):
headers read with ranged requests before any weight moves, shards fetched at their first read into
the normal Hugging Face cache, and that cache then used offline."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import surgery
from surgery.errors import CheckpointError, IncompatibleInputsError
from _support import read_folder, write_st
from hub_server import use_hub

FAKE_TOKEN = "hf_PullTestTokenDoNotPrint0123456789"


@pytest.fixture
def hub(server, tmp_path, monkeypatch):
    """A fresh loopback Hub and a fresh cache, online; ``hub.cache`` is the cache folder."""
    state = server.reset()
    state.cache = use_hub(monkeypatch, tmp_path, server.url, token=FAKE_TOKEN)
    state.url = server.url
    return state


def go_offline(monkeypatch, hub):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return len(hub.requests)


def tiny_sharded(folder: Path, seed: int, first_shape=(128, 128)) -> Path:
    """Two shards and an index, weights far larger than headers."""
    g = torch.Generator().manual_seed(seed)
    a = {"model.layers.0.mlp.weight": torch.randn(first_shape, generator=g),
         "model.layers.0.norm.weight": torch.randn(128, generator=g)}
    b = {"model.layers.1.mlp.weight": torch.randn(128, 128, generator=g),
         "lm_head.weight": torch.randn(64, 128, generator=g)}
    write_st(folder / "model-00001-of-00002.safetensors", a)
    write_st(folder / "model-00002-of-00002.safetensors", b)
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in a}, **{k: "model-00002-of-00002.safetensors" for k in b}}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": False}))
    return folder


def header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def shard_requests(hub, repo_id: str):
    return [(m, p, r) for m, p, r in hub.requests if p.startswith(f"/{repo_id}/resolve/") and p.endswith(".safetensors")]


def test_shape_mismatch_fails_on_headers_before_any_weight_byte(hub, tmp_path):
    a = tiny_sharded(tmp_path / "a", 1)
    c = tiny_sharded(tmp_path / "c", 2, first_shape=(128, 96))
    hub.add_repo("org/a", a)
    hub.add_repo("org/c", c)
    start = time.perf_counter()
    with pytest.raises(IncompatibleInputsError) as e:
        surgery.soup(["org/a", "org/c"], tmp_path / "out")
    assert time.perf_counter() - start < 10
    assert "model.layers.0.mlp.weight" in str(e.value) and "[128, 96]" in str(e.value)
    assert not (tmp_path / "out").exists()
    # the server sent each shard's 8-byte length and its header, and not one byte more
    for folder, repo_id in ((a, "org/a"), (c, "org/c")):
        for shard in sorted(folder.glob("*.safetensors")):
            assert hub.served[(repo_id, shard.name)] == header_bytes(shard), shard.name
            assert hub.full_gets[(repo_id, shard.name)] == 0
        requests = shard_requests(hub, repo_id)
        assert requests and all(m == "GET" and r for m, r in ((m, r) for m, _, r in requests)), requests
    # no shard reached the cache; config and index did
    assert not list(hub.cache.rglob("*.safetensors"))
    assert list(hub.cache.rglob("config.json")) and list(hub.cache.rglob("model.safetensors.index.json"))
    # through the CLI: one line on stderr, non-zero exit
    r = CliRunner().invoke(surgery_app(), ["soup", "org/a", "org/c", "-o", str(tmp_path / "out2")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "model.layers.0.mlp.weight" in r.output, r.output
    assert hub.full_gets[("org/a", "model-00001-of-00002.safetensors")] == 0


def surgery_app():
    from surgery_cli.app import app

    return app


def test_soup_pulls_each_shard_once_then_runs_offline(hub, llama, tmp_path, monkeypatch):
    commit = hub.add_repo("org/llama-base", llama.base)
    hub.add_repo("org/llama-v1", llama.v1)
    hub.add_repo("org/llama-v2", llama.v2)
    expected = read_folder(surgery.soup([llama.base, llama.v1], tmp_path / "local"))

    out = surgery.soup(["org/llama-base", "org/llama-v1"], tmp_path / "remote")
    got = read_folder(out)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    record = json.loads((out / "surgery_recipe.json").read_text())
    assert [e["source"] for e in record["inputs"]] == ["org/llama-base", "org/llama-v1"]
    assert record["inputs"][0]["revision"] == commit  # the commit the snapshot came from
    assert json.loads((out / "config.json").read_text())["surgery_fixture"] == "llama-base"
    assert (out / "tokenizer.json").exists()
    shards = sorted(p.name for p in llama.base.glob("*.safetensors"))
    for repo_id in ("org/llama-base", "org/llama-v1"):
        for name in shards:  # downloaded whole once, after its header was read with two ranges
            assert hub.full_gets[(repo_id, name)] == 1, (repo_id, name)
            assert hub.served[(repo_id, name)] == (llama.base / name).stat().st_size + header_bytes(llama.base / name)

    # online again, by commit: everything comes from the cache
    gets = sum(hub.full_gets.values())
    surgery.soup(["org/llama-base@" + commit, "org/llama-v1"], tmp_path / "again")
    assert sum(hub.full_gets.values()) == gets
    assert read_folder(tmp_path / "again").keys() == expected.keys()

    # only the headers of v2 (inspect reads no weights), then offline
    surgery.inspect(["org/llama-v2"])
    assert all(hub.full_gets[("org/llama-v2", n)] == 0 for n in shards)
    seen = go_offline(monkeypatch, hub)
    out = surgery.soup(["org/llama-base", "org/llama-v1@" + hub.repos["org/llama-v1"].refs["main"]],
                       tmp_path / "offline")
    assert all(torch.equal(read_folder(out)[k], expected[k]) for k in expected)
    r = CliRunner().invoke(surgery_app(), ["inspect", "org/llama-base@" + commit, "--summary"])
    assert r.exit_code == 0 and f"org/llama-base@{commit}: {len(expected)} tensors" in r.output, r.output
    assert len(hub.requests) == seen  # offline means no request at all

    with pytest.raises(CheckpointError) as e:
        surgery.soup(["org/llama-base", "org/llama-v2"], tmp_path / "never")
    message = str(e.value)
    assert "org/llama-v2" in message and "HF_HUB_OFFLINE" in message and shards[0] in message and "\n" not in message
    with pytest.raises(CheckpointError) as e:
        surgery.open_checkpoint("org/absent")
    assert "org/absent" in str(e.value) and "HF_HUB_OFFLINE" in str(e.value) and "\n" not in str(e.value)
    r = CliRunner().invoke(surgery_app(), ["inspect", "org/absent"])
    assert r.exit_code == 1 and r.output.startswith("error: ") and "org/absent" in r.output
    assert len(hub.requests) == seen


def test_inspect_from_remote_headers(hub, llama, tmp_path):
    hub.add_repo("org/llama", llama.base)
    r = CliRunner().invoke(surgery_app(), ["inspect", "org/llama", "--json"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    local = surgery.inspect([llama.base])
    assert [tuple(t[:2]) + (tuple(t[2]),) for t in report["tensors"]] == [tuple(t) for t in local.tensors]
    assert [s["file"] for s in report["checkpoints"][0]["shards"]] == [s.file for s in local.checkpoints[0].shards]
    assert not [f for _, f in hub.full_gets if f.endswith(".safetensors")]
    assert all(m == "GET" and rng for m, _, rng in shard_requests(hub, "org/llama"))
    assert sum(hub.weight_bytes_served().values()) == sum(header_bytes(p) for p in llama.base.glob("*.safetensors"))


def test_single_file_repo_fetched_at_first_read(hub, tmp_path):
    """No index: the shard is found in the repo's tree listing; ``Checkpoint.read`` fetches it."""
    folder = tmp_path / "single"
    tensors = {"w": torch.arange(4096, dtype=torch.float32).reshape(64, 64), "b": torch.ones(64, dtype=torch.bfloat16)}
    write_st(folder / "model.safetensors", tensors)
    write_st(folder / "extra.safetensors", {"other": torch.zeros(3)})  # model.safetensors wins, as locally
    hub.add_repo("org/single", folder)
    ckpt = surgery.open_checkpoint("org/single")
    assert set(ckpt.tensors) == {"w", "b"} and hub.served[("org/single", "model.safetensors")] == \
        header_bytes(folder / "model.safetensors")
    assert torch.equal(ckpt.read("w"), tensors["w"]) and torch.equal(ckpt.read("b"), tensors["b"])
    assert hub.full_gets[("org/single", "model.safetensors")] == 1 and not hub.served[("org/single", "extra.safetensors")]
    assert Path(ckpt.tensors["w"].file).is_symlink()  # the normal cache layout: snapshot -> blob


def test_remote_errors_are_one_line(hub, tmp_path):
    hub.add_repo("org/there", tiny_sharded(tmp_path / "t", 3))
    for spec, words in (("org/absent", "not found"), ("org/there@no-such-branch", "revision not found")):
        with pytest.raises(CheckpointError) as e:
            surgery.open_checkpoint(spec)
        assert spec in str(e.value) and words in str(e.value) and "\n" not in str(e.value), str(e.value)
    # a shard whose header lies about its size is refused from the header alone
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "t", bad)
    shard = bad / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    hub.add_repo("org/bad", bad)
    with pytest.raises(CheckpointError, match="truncated") as e:
        surgery.open_checkpoint("org/bad")
    assert "models--org--bad" in str(e.value) and not [f for _, f in hub.full_gets if f.endswith(".safetensors")]
    assert FAKE_TOKEN not in str(e.value)
    assert not hub.unhandled, hub.unhandled


def test_lora_adapter_and_base_from_the_hub(hub, llama, tmp_path):
    """An adapter repo is small and read again from its folder: it is fetched whole; its base lazily."""
    adapter = tmp_path / "adapter"
    g = torch.Generator().manual_seed(5)
    write_st(adapter / "adapter_model.safetensors", {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 64, generator=g),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(64, 2, generator=g)})
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
         "base_model_name_or_path": "org/llama-base"}))
    hub.add_repo("org/llama-base", llama.base)
    hub.add_repo("org/adapter", adapter)
    expected = read_folder(surgery.soup([llama.base, adapter], tmp_path / "local", base=llama.base))
    out = surgery.soup(["org/llama-base", "org/adapter"], tmp_path / "remote", base="org/llama-base")
    got = read_folder(out)
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    assert hub.full_gets[("org/adapter", "adapter_model.safetensors")] == 1
