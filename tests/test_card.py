"""Model cards: Hub front matter, provenance (command, inputs' content hashes, Hub revisions, output
shard hashes), the stored plan, and byte-for-byte determinism. Expected hashes are computed here from
the files with hashlib and the safetensors header, independently of the library."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import yaml

import surgery
import surgery.card
from _support import data_start, header_of, make_hub_cache, weight_files

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def front_matter(folder: Path) -> dict:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def independent_content_hash(folder: Path) -> str:
    """sha256 over sorted ``name\\tsha256(bytes)`` lines of every stored tensor, from the raw files."""
    lines = {}
    for f in weight_files(folder):
        header, start, raw = header_of(f), data_start(f), f.read_bytes()
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            a, b = entry["data_offsets"]
            lines[name] = hashlib.sha256(raw[start + a:start + b]).hexdigest()
    return hashlib.sha256("".join(f"{n}\t{lines[n]}\n" for n in sorted(lines)).encode()).hexdigest()


@pytest.fixture(autouse=True)
def content_hashes(monkeypatch):
    """These tests read the inputs' content hashes, which outputs record when asked to."""
    monkeypatch.setenv("SURGERY_CONTENT_HASH", "1")


def test_soup_card_front_matter_hashes_and_plan(llama, tmp_path):
    out = surgery.soup([llama.base, llama.v1, llama.v2], tmp_path / "soup", max_shard_size=100_000)
    meta = front_matter(out)
    assert meta["library_name"] == "transformers"
    assert "surgery" in meta["tags"] and "soup" in meta["tags"]
    assert "base_model" not in meta  # local inputs: listed in the body, never as Hub ids
    record = json.loads((out / "surgery_recipe.json").read_text())
    for entry, src in zip(record["inputs"], [llama.base, llama.v1, llama.v2]):
        assert entry["source"] == str(src)
        assert entry["content_sha256"] == independent_content_hash(src)
        assert entry["content_sha256"] in (out / "README.md").read_text()
    shards = weight_files(out)
    assert len(shards) > 1
    assert record["outputs"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shards}
    card = (out / "README.md").read_text()
    for p in shards:
        assert hashlib.sha256(p.read_bytes()).hexdigest() in card
    assert "library call" in card and record["command"] is None
    plan = surgery.Plan.from_json((out / "surgery_plan.json").read_text())
    assert plan.inputs == [str(llama.base), str(llama.v1), str(llama.v2)]
    assert {t.spec.name for t in plan.tensors} == {n for p in shards for n in header_of(p) if n != "__metadata__"}


def test_card_is_deterministic(llama, tmp_path):
    a = surgery.soup([llama.base, llama.v1], tmp_path / "a" / "soup", weights=[0.3, 0.7])
    b = surgery.soup([llama.base, llama.v1], tmp_path / "b" / "soup", weights=[0.3, 0.7])
    for name in ("README.md", "surgery_recipe.json", "surgery_plan.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert str(tmp_path) not in (a / "README.md").read_text().replace(str(llama.base), "").replace(str(llama.v1), "")


def test_cli_records_the_command_line_as_given(llama, tmp_path, monkeypatch):
    from surgery_cli.app import main

    monkeypatch.setattr(surgery.card, "COMMAND", None)
    monkeypatch.chdir(llama.base.parent)
    argv = ["/some/bin/surgery", "soup", llama.base.name, llama.v1.name, "-o", str(tmp_path / "cli"), "-q"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None)
    card = (tmp_path / "cli" / "README.md").read_text()
    assert f"surgery soup {llama.base.name} {llama.v1.name} -o {tmp_path / 'cli'} -q" in card
    assert json.loads((tmp_path / "cli" / "surgery_recipe.json").read_text())["command"] == ["surgery", *argv[1:]]


def test_hub_inputs_record_id_revision_and_relation(llama, hub_cache, tmp_path):
    for name in ("base", "v1", "v2"):
        make_hub_cache(hub_cache, f"tiny-org/llama-{name}", getattr(llama, name), COMMIT)
    out = surgery.soup(["tiny-org/llama-v1", f"tiny-org/llama-v2@{COMMIT}"], tmp_path / "soup")
    meta = front_matter(out)
    assert meta["base_model"] == ["tiny-org/llama-v1", "tiny-org/llama-v2"]
    assert meta["base_model_relation"] == "merge"
    record = json.loads((out / "surgery_recipe.json").read_text())
    assert [e["revision"] for e in record["inputs"]] == [COMMIT, COMMIT]
    assert [e["hub_id"] for e in record["inputs"]] == ["tiny-org/llama-v1", "tiny-org/llama-v2"]
    assert record["inputs"][0]["content_sha256"] == independent_content_hash(llama.v1)
    assert COMMIT in (out / "README.md").read_text()
    result = surgery.verify(out, rerun=True)  # offline: each Hub input read again at its recorded commit
    assert result.ok and result.inputs_checked == 2, result.problems

    merged = surgery.merge("tiny-org/llama-base", ["tiny-org/llama-v1", "tiny-org/llama-v2"], tmp_path / "ties",
                           method="ties", density=0.5)
    meta = front_matter(merged)
    assert meta["base_model_relation"] == "merge" and "merge" in meta["tags"]
    assert meta["base_model"] == ["tiny-org/llama-base", "tiny-org/llama-v1", "tiny-org/llama-v2"]

    from surgery.recipes.graft import graft

    grafted = graft("tiny-org/llama-base", "tiny-org/llama-v1", tmp_path / "graft", sparsity=0.9)
    meta = front_matter(grafted)
    assert meta["base_model_relation"] == "finetune" and "graft" in meta["tags"]


@pytest.mark.parametrize("operation, relation", [
    ("soup", "merge"), ("greedy_soup", "merge"), ("merge", "merge"), ("transfer", "merge"), ("lines", "merge"),
    ("lora_merge", "finetune"), ("graft", "finetune"), ("sft_apply", "finetune"), ("reduce_intruders", "finetune"),
    ("diff", None)])
def test_relation_per_method(operation, relation):
    assert surgery.card.relation(operation) == relation
    meta = yaml.safe_load("\n".join(surgery.card.front_matter(operation, ["x"], ["org/a"])[1:-1]))
    assert meta.get("base_model_relation") == relation
    assert meta["tags"][:2] == ["surgery", operation.replace("_", "-")]


def test_greedy_soup_card(llama, tmp_path):
    scores = {str(llama.base): 1.0, str(llama.v1): 2.0}
    result = surgery.greedy_soup([llama.base, llama.v1], tmp_path / "greedy",
                                 score=lambda m: scores.get(str(m), 3.0))
    out = result.output
    record = json.loads((out / "surgery_recipe.json").read_text())
    assert record["recipe"]["operation"] == "greedy_soup"
    assert {e["content_sha256"] for e in record["inputs"]} == {independent_content_hash(llama.base),
                                                              independent_content_hash(llama.v1)}
    assert record["outputs"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in weight_files(out)}
    assert "greedy-soup" in front_matter(out)["tags"] and (out / "surgery_plan.json").exists()
    assert surgery.verify(out).ok


def test_intruder_summary_table(tmp_path):
    recipe = {"operation": "reduce_intruders", "ft": "./ft-lora", "epsilon": 0.5, "top_k": 10, "lambda": 0.0,
              "corrected": {"layers.1.q.weight": 1, "layers.0.q.weight": 3}}
    record = surgery.card.write_card(tmp_path, recipe, [], [], "mitigated", shards={})
    card = (tmp_path / "README.md").read_text()
    assert "| `./ft-lora` | 0.5 | 4 | 2 |" in card
    assert card.index("layers.0.q.weight` | 3") < card.index("layers.1.q.weight` | 1")
    assert record["recipe"] == recipe and front_matter(tmp_path)["tags"][:2] == ["surgery", "reduce-intruders"]


@pytest.mark.parametrize("value", ["org/model-1.5", "yes", "12", "a: b", "-x", "null", "tiny-org/llama_v2"])
def test_front_matter_values_read_back_as_strings(value):
    meta = yaml.safe_load("\n".join(surgery.card.front_matter("soup", [value], [value])[1:-1]))
    assert meta["base_model"] == [value] and meta["tags"][-1] == value


def test_without_content_hashing_the_card_records_header_fingerprints(llama, tmp_path, monkeypatch):
    """Content hashes cost a sha256 pass over every input byte: by default a card records each
    input's header fingerprint instead (recomputed here from the header), and verify still passes."""
    from surgery.io.checkpoint import open_checkpoint
    from surgery.verify import verify

    monkeypatch.delenv("SURGERY_CONTENT_HASH")
    a, b = llama.base, llama.v1
    out = surgery.soup([a, b], tmp_path / "soup")
    record = json.loads((out / "surgery_recipe.json").read_text())
    for entry, src in zip(record["inputs"], (a, b)):
        assert "content_sha256" not in entry
        h = hashlib.sha256()
        for t in open_checkpoint(src).tensors.values():
            h.update(f"{t.name}|{t.dtype}|{list(t.shape)}|{t.nbytes}\n".encode())
        assert entry["header_sha256"] == h.hexdigest()
        assert h.hexdigest()[:16] in (out / "README.md").read_text()
    assert verify(out).ok  # shard hashes are recorded either way


def test_hub_inputs_record_the_file_hashes_the_hub_publishes(llama, hub_cache, tmp_path, monkeypatch):
    """Without a content hash pass, a Hub input's card entry still names each weight file's sha256
    (the LFS object id the cache names its blob by): here checked against the files' own bytes."""
    monkeypatch.delenv("SURGERY_CONTENT_HASH")
    make_hub_cache(hub_cache, "tiny-org/llama-v1", llama.v1, COMMIT)
    out = surgery.soup(["tiny-org/llama-v1", llama.v2], tmp_path / "soup")
    record = json.loads((out / "surgery_recipe.json").read_text())
    hub, local = record["inputs"]
    expected = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in weight_files(llama.v1)}
    assert len(expected) > 1 and hub["hub_file_sha256"] == expected
    assert "content_sha256" not in hub and "hub_file_sha256" not in local
    card = (out / "README.md").read_text()
    assert all(f"| 0 | `{name}` | `{sha}` |" in card for name, sha in expected.items())


def test_content_hashes_asked_for_by_flag_or_context(llama, tmp_path, monkeypatch):
    from surgery_cli.app import main

    monkeypatch.delenv("SURGERY_CONTENT_HASH")
    monkeypatch.setattr(sys, "argv", ["surgery", "soup", str(llama.base), str(llama.v1), "-o", str(tmp_path / "cli"),
                                      "-q", "--content-hash"])
    with pytest.raises(SystemExit) as e:
        main()
    assert e.value.code in (0, None)
    record = json.loads((tmp_path / "cli" / "surgery_recipe.json").read_text())
    assert [x["content_sha256"] for x in record["inputs"]] == [independent_content_hash(p) for p in (llama.base, llama.v1)]

    with surgery.content_hashing():
        lib = surgery.soup([llama.base, llama.v1], tmp_path / "lib")
    assert json.loads((lib / "surgery_recipe.json").read_text())["inputs"] == record["inputs"]
    monkeypatch.setenv("SURGERY_CONTENT_HASH", "1")
    with surgery.content_hashing(False):  # the context wins over the environment
        off = surgery.soup([llama.base, llama.v1], tmp_path / "off")
    assert all("content_sha256" not in x for x in json.loads((off / "surgery_recipe.json").read_text())["inputs"])
