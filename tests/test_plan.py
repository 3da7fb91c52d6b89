"""The plan is plain data, and any output shard can be computed from it alone."""
from __future__ import annotations

import json

import pytest
import torch

import surgery
from surgery.engine.plan import Call, OutputTensor, Ref
from surgery.errors import PlanError
from surgery.io.checkpoint import open_checkpoints
from surgery.io.writer import TensorSpec
from surgery.recipes.soup import plan_soup
from _support import assert_close_ulp, read_folder, soup_reference


@pytest.fixture
def llama_plan(llama):
    ckpts = open_checkpoints([str(llama.base), str(llama.v1), str(llama.bf16a)])
    plan, overrides = plan_soup(ckpts, [0.5, 0.3, 0.2], dtype="bf16", max_shard_size="100KB",
                                recipe={"operation": "soup", "note": "test"})
    assert overrides == {}
    return plan


def test_plan_json_round_trip(llama_plan):
    text = llama_plan.to_json()
    json.loads(text)  # plain JSON
    again = surgery.Plan.from_json(text)
    assert again == llama_plan
    assert again.to_json() == text
    assert again.shards() == llama_plan.shards()
    assert len(llama_plan.shards()) >= 3


def test_hand_built_plan_round_trip(tmp_path):
    t = [OutputTensor(TensorSpec("x", "F32", (2, 3)),
                      Call.of("weighted_sum", [Ref(0, "x"), Call.of("weighted_sum", [Ref(1, "x"), Ref(2, "y")],
                                                                    weights=[0.5, 0.5])], weights=[1.0, -1.0])),
         OutputTensor(TensorSpec("ids", "I64", (4,)), Call.of("copy", [Ref(1, "ids")]))]
    plan = surgery.Plan(["a", "b", "c"], t, max_shard_size="1KB", allow_pickle=True, recipe={"k": [1, 2]})
    assert plan.max_shard_size == 1000
    again = surgery.Plan.from_json(plan.to_json())
    assert again == plan and again.allow_pickle is True and again.recipe == {"k": [1, 2]}


@pytest.mark.parametrize("bad", [
    {"op": "no_such_op", "args": [{"ref": [0, "x"]}]},
    {"op": "weighted_sum", "args": [{"ref": [0, "x"]}], "params": {}},  # missing weights
    {"op": "copy", "args": [{"ref": [0, "x"]}], "params": {"weights": [1.0]}},  # unknown parameter
])
def test_plan_with_bad_operation_is_refused(bad):
    data = {"inputs": ["a"], "max_shard_size": 100, "tensors": [{"name": "x", "dtype": "F32", "shape": [1],
                                                                  "expr": bad}]}
    with pytest.raises(PlanError):
        surgery.Plan.from_dict(data)


def test_shards_executed_separately_are_byte_identical(llama_plan, llama, tmp_path):
    plan = surgery.Plan.from_json(llama_plan.to_json())  # as another process would receive it
    n = len(plan.shards())
    whole = tmp_path / "whole"
    whole.mkdir()
    shards = surgery.execute(plan, whole, device="cpu")
    names = [s.filename for s in shards]
    assert sorted(p.name for p in whole.iterdir()) == sorted(names)
    together = tmp_path / "together"
    together.mkdir()
    for k in reversed(range(n)):  # any order
        alone = tmp_path / f"alone-{k}"
        alone.mkdir()
        surgery.execute(plan, alone, shard_indices=[k], device="cpu")
        assert [p.name for p in alone.iterdir()] == [names[k]], "only the requested shard is written"
        assert (alone / names[k]).read_bytes() == (whole / names[k]).read_bytes()
        surgery.execute(plan, together, shard_indices=[k], device="cpu")
    for name in names:
        assert (together / name).read_bytes() == (whole / name).read_bytes(), name
    # and what was written is the planned soup (bf16 output of fp32, fp32 and bf16 inputs)
    got = read_folder(whole)
    ins = [read_folder(p) for p in (llama.base, llama.v1, llama.bf16a)]
    for k in got:
        assert_close_ulp(got[k], soup_reference([i[k] for i in ins], [0.5, 0.3, 0.2], torch.bfloat16), 1, k)


def test_execute_uses_the_plan_inputs(tmp_path, qwen2):
    """A hand-written plan (task-arithmetic style, nested operations) runs from its inputs' locations."""
    a, b, c = read_folder(qwen2.base), read_folder(qwen2.v1), read_folder(qwen2.v2)
    name = "model.norm.weight"
    expr = Call.of("weighted_sum", [Ref(0, name), Call.of("weighted_sum", [Ref(1, name), Ref(2, name)],
                                                           weights=[1.0, -1.0])], weights=[1.0, 0.5])
    emb = "model.embed_tokens.weight"
    plan = surgery.Plan([str(qwen2.base), str(qwen2.v1), str(qwen2.v2)], [
        OutputTensor(TensorSpec(name, "F32", tuple(a[name].shape)), expr),
        OutputTensor(TensorSpec("lm_head.weight", "F32", tuple(a[emb].shape)), Call.of("copy", [Ref(1, emb)])),
    ])
    surgery.execute(surgery.Plan.from_json(plan.to_json()), tmp_path, device="cpu")
    got = read_folder(tmp_path)
    inner = b[name] * 1.0 + c[name] * -1.0
    assert_close_ulp(got[name], a[name] * 1.0 + inner * 0.5, 1, name)
    assert torch.equal(got["lm_head.weight"], b[emb])
