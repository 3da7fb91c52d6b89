"""PEFT LoRA adapters as inputs: ``surgery lora merge`` against peft's own ``merge_and_unload``, and
adapters where a fine-tune is expected (soup, merge, transfer).

Adapters are real: made with ``peft.get_peft_model`` on real tiny transformers models (with random,
non-zero B: ``init_lora_weights=False``) and written with ``save_pretrained``. Every expected value
comes from peft loading those files again (``PeftModel.from_pretrained(...).merge_and_unload()``)
or from plain float64 arithmetic on tensors read back with safetensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from _support import read_folder

peft = pytest.importorskip("peft")

TOL = dict(rtol=1e-5, atol=1e-6)  # peft merges in float32, surgery in float64 rounded once


# ---------------------------------------------------------------------------------------------
# Building adapters and references (no surgery here)


def auto_class(name: str):
    import transformers

    return getattr(transformers, name)


def make_adapter(base: Path, out: Path, auto: str, seed: int = 0, randomize_saved: bool = False,
                 submodule: str | None = None, **lora) -> Path:
    """get_peft_model on ``base`` (or its ``submodule``) with random non-zero LoRA weights, saved."""
    torch.manual_seed(seed)
    model = auto_class(auto).from_pretrained(base)
    if submodule:
        model = getattr(model, submodule)
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **lora))
    if randomize_saved:  # peft copies the base's head: move it so the replacement is visible
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "modules_to_save" in name:
                    p.add_(torch.randn_like(p) * 0.5)
    pm.save_pretrained(out)
    return out


def peft_merged(base: Path, adapter: Path, auto: str, submodule: str | None = None) -> dict[str, torch.Tensor]:
    """peft's own merge of the saved adapter into the saved base."""
    model = auto_class(auto).from_pretrained(base)
    if submodule:
        model = getattr(model, submodule)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, **tol) -> None:
    torch.testing.assert_close(actual, expected, **(tol or TOL), msg=lambda m: f"{what}: {m}")


def assert_matches(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                   changed_at_least: int = 1) -> None:
    """Every stored tensor equals the reference; tensors the reference leaves alone are the base's bytes."""
    changed = 0
    for name, value in got.items():
        assert value.dtype == expected[name].dtype, name
        assert_close(value, expected[name], name)
        if torch.equal(expected[name], base[name]):
            assert torch.equal(value, base[name]), f"{name} is untouched by the adapter but differs from the base"
        else:
            changed += 1
    assert changed >= changed_at_least, f"only {changed} tensors changed: the case tests nothing"


# ---------------------------------------------------------------------------------------------
# Models the shared fixtures lack


@pytest.fixture(scope="module")
def lora_models(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    root = tmp_path_factory.mktemp("lora-models")

    def config(layers=2, **kw):
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
                           tie_word_embeddings=False, **kw)

    torch.manual_seed(7)
    LlamaForSequenceClassification(config(num_labels=3, pad_token_id=0)).save_pretrained(root / "seqcls")
    torch.manual_seed(8)
    LlamaForCausalLM(config(layers=1)).save_pretrained(root / "one-layer")
    return root


# ---------------------------------------------------------------------------------------------
# surgery lora merge == peft merge_and_unload

LLAMA_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]
CASES = {
    "llama-plain": ("llama", dict(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS)),
    "llama-rslora": ("llama", dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "gate_proj"])),
    "llama-patterns": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                     rank_pattern={"layers.1.self_attn.q_proj": 2, "v_proj": 6},
                                     alpha_pattern={"q_proj": 3, "model.layers.0.mlp.up_proj": 20})),
    "llama-layers": ("llama", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])),
    "llama-embedding": ("llama", dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])),
    "gpt2-conv1d": ("gpt2", dict(r=4, lora_alpha=16, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc"])),
    "gpt2-lora-bias": ("gpt2", dict(r=2, lora_alpha=4, fan_in_fan_out=True, target_modules=["c_attn"], lora_bias=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cli_merge_matches_peft(case, llama, gpt2, cli, tmp_path):
    family, lora = CASES[case]
    fam = {"llama": llama, "gpt2": gpt2}[family]
    adapter = make_adapter(fam.base, tmp_path / "adapter", fam.auto, **lora)
    out = tmp_path / "merged"
    cli("lora", "merge", fam.base, adapter, "-o", out)
    expected = peft_merged(fam.base, adapter, fam.auto)
    base = read_folder(fam.base)
    got = read_folder(out)
    assert set(got) == set(base), "laid out like the base"
    assert_matches(got, expected, base, changed_at_least=2 if case != "gpt2-lora-bias" else 4)
    if case == "llama-layers":  # layers_to_transform=[1]: layer 0 untouched
        assert all(torch.equal(got[n], base[n]) for n in got if ".layers.0." in n)
    # transformers loads it as the base: nothing missing, nothing left over; config and tokenizer came along
    _, info = auto_class(fam.auto).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    recipe = json.loads((out / "surgery_recipe.json").read_text())["recipe"]
    assert recipe["operation"] == "lora_merge" and recipe["scale"] == 1.0
    assert "lora" in (out / "README.md").read_text()


def test_library_merge_scale_and_backends(llama, tmp_path, monkeypatch):
    """The library call with --scale 0.5, on the numpy path and on the torch path: base + 0.5 * (merged - base)."""
    import surgery.lora
    from surgery.recipes.lora import merge

    adapter = make_adapter(llama.base, tmp_path / "adapter", llama.auto, seed=3, r=4, lora_alpha=8,
                           target_modules=LLAMA_TARGETS)
    merged = peft_merged(llama.base, adapter, llama.auto)
    base = read_folder(llama.base)
    expected = {n: (base[n].double() + 0.5 * (merged[n].double() - base[n].double())).float() for n in base}
    outputs = {}
    for backend in ("numpy", "torch"):
        monkeypatch.setenv("SURGERY_BACKEND", backend)
        outputs[backend] = read_folder(merge(llama.base, adapter, tmp_path / backend, scale=0.5, device="cpu"))
        assert_matches(outputs[backend], expected, base)
    for n in base:
        assert torch.equal(outputs["numpy"][n], outputs["torch"][n]), f"{n}: numpy and torch paths differ"
    # the plan is plain data: the low-rank delta survives a JSON round trip
    from surgery.engine.plan import Plan

    plan = surgery.lora.adapted(adapter, llama.base).lazy.plan()
    assert Plan.from_json(plan.to_json()).to_dict() == plan.to_dict()
    assert any("lora_delta" in json.dumps(t["expr"]) for t in plan.to_dict()["tensors"])


def test_bf16_base(llama, cli, tmp_path):
    """A bf16 base: the delta is computed wide and the sum rounded once to bf16 (peft rounds the delta to
    bf16 first, so the two may differ by one bf16 unit)."""
    adapter = make_adapter(llama.bf16a, tmp_path / "adapter", llama.auto, r=4, lora_alpha=8,
                           target_modules=LLAMA_TARGETS)
    out = tmp_path / "merged"
    cli("lora", "merge", llama.bf16a, adapter, "-o", out)
    got, base = read_folder(out), read_folder(llama.bf16a)
    expected = peft_merged(llama.bf16a, adapter, llama.auto)
    for n, v in got.items():
        assert v.dtype == torch.bfloat16, n
        assert_close(v.float(), expected[n].float(), n, rtol=2 ** -7, atol=1e-6)
        if torch.equal(expected[n], base[n]):
            assert torch.equal(v, base[n]), n


def test_modules_to_save_replace_the_head(lora_models, cli, tmp_path):
    """A sequence-classification adapter: LoRA on q_proj, the classifier head (``score``) trained in full."""
    base = lora_models / "seqcls"
    auto = "AutoModelForSequenceClassification"
    adapter = make_adapter(base, tmp_path / "adapter", auto, randomize_saved=True, task_type="SEQ_CLS", r=4,
                           lora_alpha=8, target_modules=["q_proj"])
    stored = read_folder(adapter)
    assert any(k.endswith("score.weight") for k in stored), sorted(stored)
    out = tmp_path / "merged"
    cli("lora", "merge", base, adapter, "-o", out)
    got, base_t = read_folder(out), read_folder(base)
    expected = peft_merged(base, adapter, auto)
    assert not torch.equal(expected["score.weight"], base_t["score.weight"])
    assert torch.equal(got["score.weight"], stored[[k for k in stored if k.endswith("score.weight")][0]])
    assert_matches(got, expected, base_t, changed_at_least=3)


def test_a_container_in_modules_to_save_brings_every_tensor_inside_it(lora_models, cli, tmp_path):
    """``modules_to_save`` naming a container (a layer's whole MLP, not one of its Linears): peft
    trains and saves every tensor inside it, and they replace the base's."""
    base = lora_models / "seqcls"
    auto = "AutoModelForSequenceClassification"
    adapter = make_adapter(base, tmp_path / "adapter", auto, randomize_saved=True, task_type="SEQ_CLS", r=2,
                           lora_alpha=4, target_modules=["q_proj"], layers_to_transform=[0],
                           modules_to_save=["score", "layers.1.mlp"])
    stored = read_folder(adapter)
    assert any(".layers.1.mlp.up_proj." in k for k in stored), sorted(stored)
    out = tmp_path / "merged"
    cli("lora", "merge", base, adapter, "-o", out)
    base_t = read_folder(base)
    expected = peft_merged(base, adapter, auto)
    assert not torch.equal(expected["model.layers.1.mlp.up_proj.weight"], base_t["model.layers.1.mlp.up_proj.weight"])
    assert_matches(read_folder(out), expected, base_t, changed_at_least=5)


def test_adapter_on_inner_model_maps_onto_prefixed_base(llama, tmp_path):
    """An adapter trained on the bare ``LlamaModel`` (keys ``base_model.model.layers...``) merged into the
    ``LlamaForCausalLM`` checkpoint (``model.layers...``): the prefix is worked out once for the adapter."""
    from surgery.recipes.lora import merge

    adapter = make_adapter(llama.base, tmp_path / "adapter", llama.auto, submodule="model", r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj"])
    assert all(k.startswith("base_model.model.layers.") for k in read_folder(adapter))
    inner = peft_merged(llama.base, adapter, llama.auto, submodule="model")
    base = read_folder(llama.base)
    expected = {n: inner[n.removeprefix("model.")] if n.startswith("model.") else base[n] for n in base}
    assert_matches(read_folder(merge(llama.base, adapter, tmp_path / "out")), expected, base, changed_at_least=4)


# ---------------------------------------------------------------------------------------------
# Refusals


def test_dora_refused_naming_the_file(llama, cli, tmp_path):
    adapter = make_adapter(llama.base, tmp_path / "dora", llama.auto, r=4, lora_alpha=8, use_dora=True,
                           target_modules=["q_proj"])
    out = tmp_path / "out"
    result = cli("lora", "merge", llama.base, adapter, "-o", out, ok=False)
    message = result.output.strip()
    assert len(message.splitlines()) == 1 and "DoRA" in message and str(adapter / "adapter_config.json") in message
    assert not out.exists()
    # the weights alone give it away too, even with the config flag cleared
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    message = cli("lora", "merge", llama.base, adapter, "-o", out, ok=False).output.strip()
    assert "DoRA" in message and str(adapter / "adapter_model.safetensors") in message and "lora_magnitude_vector" in message


def test_target_missing_from_base(llama, lora_models, cli, tmp_path):
    """An adapter for a 2-layer model merged into a 1-layer one: every missing target is listed."""
    adapter = make_adapter(llama.base, tmp_path / "adapter", llama.auto, r=4, lora_alpha=8, target_modules=["q_proj"])
    # same module names, smaller model: hidden 32 here, 64 there, so layer 0 mismatches in shape as well
    result = cli("lora", "merge", lora_models / "one-layer", adapter, "-o", tmp_path / "out", ok=False)
    message = result.output
    assert "'model.layers.1.self_attn.q_proj.weight'" in message and "not in the base" in message
    assert "'model.layers.0.self_attn.q_proj.weight' has shape" in message
    assert not (tmp_path / "out").exists()


def test_unknown_and_unselected_adapter_tensors(llama, cli, tmp_path):
    adapter = make_adapter(llama.base, tmp_path / "adapter", llama.auto, r=4, lora_alpha=8, target_modules=["q_proj"])
    weights = adapter / "adapter_model.safetensors"
    tensors = read_folder(adapter)
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].clone()
    b = torch.randn(32, 4)
    tensors["base_model.model.model.norm.extra"] = torch.zeros(3)
    tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = a
    tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"] = b
    save_file(tensors, str(weights), metadata={"format": "pt"})
    message = cli("lora", "merge", llama.base, adapter, "-o", tmp_path / "out", ok=False).output
    assert "'base_model.model.model.norm.extra'" in message and "not a LoRA weight" in message
    assert "'model.layers.0.self_attn.k_proj'" in message and "target_modules" in message


# ---------------------------------------------------------------------------------------------
# Adapters where a model or fine-tune is expected


def test_soup_of_adapter_and_full_model(llama, cli, tmp_path):
    """uniform soup of (base + adapter) and a full fine-tune == (peft merge + ft) / 2."""
    import surgery.recipes.lora as lora

    adapter = make_adapter(llama.base, tmp_path / "adapter", llama.auto, r=4, lora_alpha=8,
                           target_modules=LLAMA_TARGETS)
    merged = peft_merged(llama.base, adapter, llama.auto)
    ft = read_folder(llama.v1)
    expected = {n: ((merged[n].double() + ft[n].double()) / 2).float() for n in ft}
    out = tmp_path / "soup"
    cli("soup", adapter, llama.v1, "--base", llama.base, "-o", out)
    got = read_folder(out)
    assert set(got) == set(ft)
    for n in ft:
        assert_close(got[n], expected[n], n)
    # without --base, the adapter's own base_model_name_or_path (peft recorded the folder it was loaded from)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(llama.base)
    again = read_folder(lora.soup([llama.v1, adapter], tmp_path / "soup2", weights=[0.25, 0.75]))
    for n in ft:
        ref = (0.25 * ft[n].double() + 0.75 * merged[n].double()).float()
        assert_close(again[n], ref, n)


def test_transfer_with_adapter_as_source_ft(llama, cli, tmp_path):
    """transfer --source-base A --source-ft ADAPTER --to T == T + (merged - A); untouched tensors are T's bytes."""
    adapter = make_adapter(llama.base, tmp_path / "adapter", llama.auto, r=4, lora_alpha=8,
                           target_modules=LLAMA_TARGETS)
    merged = peft_merged(llama.base, adapter, llama.auto)
    base, target = read_folder(llama.base), read_folder(llama.v2)
    expected = {n: (target[n].double() + (merged[n].double() - base[n].double())).float() for n in target}
    out = tmp_path / "out"
    cli("transfer", "--source-base", llama.base, "--source-ft", adapter, "--to", llama.v2, "-o", out)
    got = read_folder(out)
    assert set(got) == set(target)
    assert_matches(got, expected, target, changed_at_least=8)


def test_task_arithmetic_merge_with_adapter(llama, cli, tmp_path):
    """merge --base B ADAPTER FT == B + (merged - B) + (FT - B), the adapter one task vector among others."""
    adapter = make_adapter(llama.base, tmp_path / "adapter", llama.auto, r=4, lora_alpha=8,
                           target_modules=LLAMA_TARGETS)
    merged = peft_merged(llama.base, adapter, llama.auto)
    base, ft = read_folder(llama.base), read_folder(llama.v1)
    lam = 0.7
    expected = {n: (base[n].double() + lam * ((merged[n].double() - base[n].double())
                                              + (ft[n].double() - base[n].double()))).float() for n in base}
    out = tmp_path / "out"
    cli("merge", adapter, llama.v1, "--base", llama.base, "--lambda", str(lam), "-o", out)
    got = read_folder(out)
    for n in base:
        assert_close(got[n], expected[n], n)


def test_task_vector_from_lora(llama, tmp_path):
    """TaskVector.from_lora in Python: two adapters summed and applied leave untouched tensors exact."""
    from surgery import TaskVector

    a = make_adapter(llama.base, tmp_path / "a", llama.auto, seed=1, r=4, lora_alpha=8, target_modules=["q_proj"])
    b = make_adapter(llama.base, tmp_path / "b", llama.auto, seed=2, r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"])
    ma, mb = peft_merged(llama.base, a, llama.auto), peft_merged(llama.base, b, llama.auto)
    base = read_folder(llama.base)
    tv = TaskVector.from_lora(a, llama.base) + 0.5 * TaskVector.from_lora(b, llama.base)
    got = read_folder(tv.apply_to(llama.base).save(tmp_path / "out"))
    expected = {n: (base[n].double() + (ma[n].double() - base[n].double())
                    + 0.5 * (mb[n].double() - base[n].double())).float() for n in base}
    assert_matches(got, expected, base, changed_at_least=4)


def ties_reference(taus: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES in float64: trim each task vector to its top-k magnitudes (k = max(1, int(density * n))),
    elect a sign per entry from the sum (zero goes to +), average the entries that agree with it."""
    trimmed = []
    for tau in taus:
        flat = tau.reshape(-1).abs()
        k = max(1, int(density * flat.numel()))
        threshold = flat.float().topk(k).values[-1]
        trimmed.append(torch.where(tau.abs().float() >= threshold, tau, torch.zeros_like(tau)))
    elected = torch.where(sum(trimmed) >= 0, 1.0, -1.0).double()
    agree = [(torch.sign(t) * elected > 0).double() for t in trimmed]
    count = sum(agree)
    return sum(t * a for t, a in zip(trimmed, agree)) / torch.where(count == 0, 1.0, count)


def test_ties_merge_with_adapter(llama, cli, tmp_path):
    """merge --method ties with an adapter among the models: the adapter's task vector is merged - base."""
    adapter = make_adapter(llama.base, tmp_path / "adapter", llama.auto, r=4, lora_alpha=8,
                           target_modules=LLAMA_TARGETS)
    merged = peft_merged(llama.base, adapter, llama.auto)
    base, ft = read_folder(llama.base), read_folder(llama.v1)
    out = tmp_path / "out"
    cli("merge", adapter, llama.v1, "--base", llama.base, "--method", "ties", "--density", "0.3", "-o", out)
    got = read_folder(out)
    for n in base:
        taus = [merged[n].double() - base[n].double(), ft[n].double() - base[n].double()]
        expected = (base[n].double() + ties_reference(taus, 0.3)).float()
        assert_close(got[n], expected, n)


def test_diff_of_adapter_then_transfer(llama, cli, tmp_path):
    """surgery diff ADAPTER BASE saves the adapter's dense delta; applying it gives peft's merge."""
    adapter = make_adapter(llama.base, tmp_path / "adapter", llama.auto, r=4, lora_alpha=8, target_modules=["q_proj"])
    delta = tmp_path / "delta"
    cli("diff", adapter, llama.base, "-o", delta)
    stored, base = read_folder(delta), read_folder(llama.base)
    assert all(v.dtype == torch.float64 for v in stored.values())  # one precision up, as every diff
    assert all(not stored[n].any() for n in stored if "q_proj" not in n)
    out = tmp_path / "out"
    cli("transfer", "--diff", delta, "--to", llama.base, "-o", out)
    assert_matches(read_folder(out), peft_merged(llama.base, adapter, llama.auto), base, changed_at_least=2)
