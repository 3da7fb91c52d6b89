"""``surgery run recipe.yaml``: chained operations in one streaming pass, equal byte for byte to the
commands run one after another; validation messages; ``--print-recipe`` replays."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from tv_support import write_checkpoint


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for n in h.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                out[n] = h.get_tensor(n)
    return out


def assert_same_bytes(a: Path, b: Path) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert list(ta) == list(tb) or set(ta) == set(tb)
    assert ta, f"no tensors in {a}"
    for n in ta:
        x, y = ta[n], tb[n]
        assert x.dtype == y.dtype and x.shape == y.shape, n
        assert torch.equal(x.contiguous().view(torch.uint8), y.contiguous().view(torch.uint8)), f"{n} differs"


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def three_step(zoo, out: Path) -> dict:
    return {
        "inputs": {"base_a": str(zoo["llama/base"]), "ft_a": str(zoo["llama/ft1"]), "base_b": str(zoo["llama/target"]),
                   "other1": str(zoo["llama/ft2"]), "other2": str(zoo["llama/base"])},
        "steps": {
            "moved": {"op": "transfer", "source_base": "base_a", "source_ft": "ft_a", "to": "base_b"},
            "scaled": {"op": "lines", "base": "base_b", "ft": "moved", "alpha": 0.5, "beta": 0.5},
            "final": {"op": "soup", "models": ["scaled", "other1", "other2"], "weights": [0.5, 0.25, 0.25]},
        },
        "output": {"step": "final", "path": str(out)},
    }


def test_three_step_recipe_equals_three_commands(zoo, cli, tmp_path):
    base_a, ft_a, base_b, o1, o2 = (zoo[k] for k in ("llama/base", "llama/ft1", "llama/target", "llama/ft2",
                                                     "llama/base"))
    moved, scaled, final = tmp_path / "moved", tmp_path / "scaled", tmp_path / "final"
    cli("transfer", "--source-base", base_a, "--source-ft", ft_a, "--to", base_b, "-o", moved)
    cli("lines", "--base", base_b, "--ft", moved, "--alpha", 0.5, "--beta", 0.5, "-o", scaled)
    cli("soup", scaled, o1, o2, "--weights", "0.5,0.25,0.25", "-o", final)
    recipe = write_recipe(tmp_path / "r.yaml", three_step(zoo, tmp_path / "chained"))
    r = cli("run", recipe)
    assert "wrote" in r.output
    assert_same_bytes(final, tmp_path / "chained")
    assert not (tmp_path / "moved2").exists()
    # nothing intermediate was written; save: PATH writes that step too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chained", "final", "moved", "r.yaml", "scaled"]
    data = three_step(zoo, tmp_path / "chained2")
    data["steps"]["moved"]["save"] = str(tmp_path / "moved-saved")
    cli("run", write_recipe(tmp_path / "r2.yaml", data))
    assert_same_bytes(moved, tmp_path / "moved-saved")
    assert_same_bytes(final, tmp_path / "chained2")


def test_chain_of_merge_and_bf16_output(zoo, cli, tmp_path):
    """ties over a transferred model, then a soup in bf16: as the commands in sequence."""
    base, t = zoo["llama/base"], zoo["llama/target"]
    cli("transfer", "--source-base", base, "--source-ft", zoo["llama/ft1"], "--to", t, "-o", tmp_path / "m1")
    cli("merge", tmp_path / "m1", zoo["llama/ft2"], "--base", base, "--method", "ties", "--density", 0.3,
        "-o", tmp_path / "m2")
    cli("soup", tmp_path / "m2", t, "--dtype", "bf16", "-o", tmp_path / "seq")
    recipe = {"inputs": {"base": str(base), "ft1": str(zoo["llama/ft1"]), "ft2": str(zoo["llama/ft2"]), "t": str(t)},
              "steps": {"m1": {"op": "transfer", "source_base": "base", "source_ft": "ft1", "to": "t"},
                        "m2": {"op": "ties", "base": "base", "models": ["m1", "ft2"], "density": 0.3},
                        "s": {"op": "soup", "models": ["m2", "t"]}},
              "output": {"step": "s", "dtype": "bf16"}}
    cli("run", write_recipe(tmp_path / "r.yaml", recipe), "-o", tmp_path / "chained")
    assert_same_bytes(tmp_path / "seq", tmp_path / "chained")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_bf16_chain_rounds_between_steps(zoo, cli, tmp_path, monkeypatch, backend):
    """bf16 inputs: each step's value is rounded to bf16 before the next, as a saved folder would be."""
    monkeypatch.setenv("SURGERY_BACKEND", backend)
    base, ft, t = zoo["llama-bf16/base"], zoo["llama-bf16/ft1"], zoo["llama-bf16/target"]
    cli("transfer", "--source-base", base, "--source-ft", ft, "--to", t, "--scale", 0.7, "-o", tmp_path / "m")
    cli("lines", "--base", t, "--ft", tmp_path / "m", "--alpha", 0.4, "--beta", 0.3, "-o", tmp_path / "seq")
    recipe = {"inputs": {"base": str(base), "ft": str(ft), "t": str(t)},
              "steps": {"m": {"op": "transfer", "source_base": "base", "source_ft": "ft", "to": "t", "scale": 0.7},
                        "l": {"op": "lines", "base": "t", "ft": "m", "alpha": 0.4, "beta": 0.3}},
              "output": {"step": "l", "path": str(tmp_path / "chained")}}
    cli("run", write_recipe(tmp_path / "r.yaml", recipe))
    assert_same_bytes(tmp_path / "seq", tmp_path / "chained")


@pytest.mark.parametrize("weights", [None, "0.3,0.7"])
def test_bf16_chain_ending_in_a_soup_equals_the_commands(zoo, cli, tmp_path, weights):
    """A float64 step (transfer) feeding a float32 one (soup) on bf16 inputs: each step keeps its
    own precision in the one pass, so the bytes are those of the two commands."""
    base, ft, t = zoo["llama-bf16/base"], zoo["llama-bf16/ft1"], zoo["llama-bf16/target"]
    cli("transfer", "--source-base", base, "--source-ft", ft, "--to", t, "-o", tmp_path / "m")
    cli("soup", tmp_path / "m", t, *(["--weights", weights] if weights else []), "-o", tmp_path / "seq")
    soup = {"op": "soup", "models": ["m", "t"], **({"weights": [float(w) for w in weights.split(",")]} if weights else {})}
    recipe = {"inputs": {"base": str(base), "ft": str(ft), "t": str(t)},
              "steps": {"m": {"op": "transfer", "source_base": "base", "source_ft": "ft", "to": "t"}, "s": soup},
              "output": {"step": "s", "path": str(tmp_path / "chained")}}
    cli("run", write_recipe(tmp_path / "r.yaml", recipe))
    assert_same_bytes(tmp_path / "seq", tmp_path / "chained")


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_float32_step_feeding_a_float64_one_keeps_its_precision(zoo, cli, tmp_path, monkeypatch, backend):
    """The other direction: a weighted soup of bf16 models (float32) whose result is differenced
    (float64), saved as a task vector: the bytes of the two commands on either path."""
    monkeypatch.setenv("SURGERY_BACKEND", backend)
    a, b, base = zoo["llama-bf16/ft1"], zoo["llama-bf16/target"], zoo["llama-bf16/base"]
    cli("soup", a, b, "--weights", "0.3,0.7", "-o", tmp_path / "s")
    cli("diff", tmp_path / "s", base, "-o", tmp_path / "seq")
    recipe = {"inputs": {"a": str(a), "b": str(b), "base": str(base)},
              "steps": {"s": {"op": "soup", "models": ["a", "b"], "weights": [0.3, 0.7]},
                        "d": {"op": "diff", "ft": "s", "base": "base"}},
              "output": {"step": "d", "path": str(tmp_path / "chained")}}
    cli("run", write_recipe(tmp_path / "r.yaml", recipe))
    assert_same_bytes(tmp_path / "seq", tmp_path / "chained")


# -- --print-recipe: one-step recipes replay the command exactly ---------------------------------

CASES = {
    "soup-uniform": lambda z: ["soup", z["llama/ft1"], z["llama/ft2"], z["llama/base"]],
    "soup-weighted": lambda z: ["soup", z["llama/ft1"], z["llama/ft2"], "--weights", "3,1", "--dtype", "bf16"],
    "transfer": lambda z: ["transfer", "--source-base", z["llama/base"], "--source-ft", z["llama/ft1"],
                           "--to", z["llama/target"], "--scale", 0.7],
    "task_arithmetic": lambda z: ["merge", z["llama/ft1"], z["llama/ft2"], "--base", z["llama/base"],
                                  "--weights", "0.6,0.4", "--lambda", 0.9],
    "ties": lambda z: ["merge", z["llama/ft1"], z["llama/ft2"], z["llama/ft3"], "--base", z["llama/base"],
                       "--method", "ties", "--density", 0.3],
    "ties-global-lines": lambda z: ["merge", z["llama12/ft1"], z["llama12/ft2"], "--base", z["llama12/base"],
                                    "--method", "ties", "--scope", "global", "--lines", "--beta", 0.4],
    "dare_linear": lambda z: ["merge", z["llama/ft1"], z["llama/ft2"], "--base", z["llama/base"],
                              "--method", "dare_linear", "--density", 0.5, "--seed", 3],
    "dare_ties": lambda z: ["merge", z["llama/ft1"], z["llama/ft2"], "--base", z["llama/base"],
                            "--method", "dare_ties", "--density", 0.4],
    "lines": lambda z: ["lines", "--base", z["llama12/base"], "--ft", z["llama12/ft1"], "--alpha", 0.3, "--beta", 0.6],
    "diff": lambda z: ["diff", z["llama/ft1"], z["llama/base"]],
    "graft": lambda z: ["graft", "--base", z["llama/base"], "--ft", z["llama/ft1"], "--sparsity", 0.05],
    "graft-k-include": lambda z: ["graft", "--base", z["llama/base"], "--ft", z["llama/ft1"], "--k", 300,
                                  "--include", "mlp", "--include", "embed"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_print_recipe_replays_to_identical_bytes(zoo, cli, tmp_path, case):
    args = [str(a) for a in CASES[case](zoo)]
    direct = tmp_path / "direct"
    cli(*args, "-o", direct)
    r = cli(*args, "-o", tmp_path / "replayed", "--print-recipe")
    assert not (tmp_path / "replayed").exists(), "--print-recipe computes nothing"
    data = yaml.safe_load(r.output)
    assert set(data) == {"inputs", "steps", "output"} and len(data["steps"]) == 1
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(r.output)
    cli("run", recipe)
    assert_same_bytes(direct, tmp_path / "replayed")
    if case == "diff":
        assert json.loads((tmp_path / "replayed" / "surgery_delta.json").read_text())["kind"] == "task_vector"


def test_sft_apply_and_revert_replay_and_graft_feeds_a_soup(zoo, cli, tmp_path):
    base, ft = zoo["llama/base"], zoo["llama/ft1"]
    cli("sft", "extract", "--base", base, "--ft", ft, "--k", 500, "-o", tmp_path / "t.sft")
    for verb in ("apply", "revert"):
        args = ["sft", verb, str(base), "--sft", str(tmp_path / "t.sft")]
        cli(*args, "-o", tmp_path / f"{verb}-direct")
        r = cli(*args, "-o", tmp_path / f"{verb}-replayed", "--print-recipe")
        (tmp_path / f"{verb}.yaml").write_text(r.output)
        cli("run", tmp_path / f"{verb}.yaml")
        assert_same_bytes(tmp_path / f"{verb}-direct", tmp_path / f"{verb}-replayed")
    # a graft's (or an SFT's) result feeds later steps lazily
    cli("graft", "--base", base, "--ft", ft, "--sparsity", 0.05, "-o", tmp_path / "g")
    cli("soup", tmp_path / "g", tmp_path / "apply-direct", zoo["llama/ft2"], "-o", tmp_path / "seq")
    recipe = {"inputs": {"base": str(base), "ft": str(ft), "ft2": str(zoo["llama/ft2"]), "sft": str(tmp_path / "t.sft")},
              "steps": {"g": {"op": "graft", "base": "base", "ft": "ft", "sparsity": 0.05},
                        "a": {"op": "sft_apply", "model": "base", "sfts": ["sft"]},
                        "s": {"op": "soup", "models": ["g", "a", "ft2"]}},
              "output": {"step": "s", "path": str(tmp_path / "chained")}}
    cli("run", write_recipe(tmp_path / "r.yaml", recipe))
    assert_same_bytes(tmp_path / "seq", tmp_path / "chained")
    recipe["steps"]["g2"] = {"op": "graft", "base": "base", "ft": "g", "k": 10}
    recipe["output"]["step"] = "g2"
    _fails(cli, tmp_path, recipe, "step 'g2' (graft)", "save that step")


def test_graft_by_a_mask_file_in_a_recipe(zoo, cli, tmp_path):
    """A mask file (here written by a top-k graft) grafts in a recipe step, replays from
    --print-recipe, and feeds a soup as the commands in sequence do; a learned graft is refused."""
    base, ft = zoo["llama/base"], zoo["llama/ft1"]
    cli("graft", "--base", base, "--ft", ft, "--sparsity", 0.1, "-o", tmp_path / "topk", "--mask-out", tmp_path / "m.mask")
    args = ["graft", "--base", str(base), "--ft", str(ft), "--mask", str(tmp_path / "m.mask")]
    cli(*args, "-o", tmp_path / "direct")
    assert_same_bytes(tmp_path / "topk", tmp_path / "direct")  # the mask is the top-k's own
    r = cli(*args, "-o", tmp_path / "replayed", "--print-recipe")
    (tmp_path / "one.yaml").write_text(r.output)
    cli("run", tmp_path / "one.yaml")
    assert_same_bytes(tmp_path / "direct", tmp_path / "replayed")
    cli("soup", tmp_path / "direct", zoo["llama/ft2"], "-o", tmp_path / "seq")
    recipe = {"inputs": {"base": str(base), "ft": str(ft), "ft2": str(zoo["llama/ft2"]), "mask": str(tmp_path / "m.mask")},
              "steps": {"g": {"op": "graft", "base": "base", "ft": "ft", "mask": "mask"},
                        "s": {"op": "soup", "models": ["g", "ft2"]}},
              "output": {"step": "s", "path": str(tmp_path / "chained")}}
    cli("run", write_recipe(tmp_path / "r.yaml", recipe))
    assert_same_bytes(tmp_path / "seq", tmp_path / "chained")
    recipe["steps"]["g"]["sparsity"] = 0.2
    _fails(cli, tmp_path, recipe, "step 'g' (graft)", "mask file takes no sparsity")
    del recipe["steps"]["g"]["sparsity"]
    recipe["steps"]["g"]["mask"] = "g"
    _fails(cli, tmp_path, recipe, "'mask' refers to 'g', which is not an input")
    recipe["steps"]["g"] = {"op": "graft_learned", "base": "base", "ft": "ft"}
    _fails(cli, tmp_path, recipe, "cannot be chained", "--learn --mask-out")


def test_diff_step_feeds_transfer(zoo, cli, tmp_path):
    base, ft, t = zoo["llama/base"], zoo["llama/ft1"], zoo["llama/target"]
    cli("diff", ft, base, "-o", tmp_path / "d")
    cli("transfer", "--diff", tmp_path / "d", "--to", t, "-o", tmp_path / "seq")
    recipe = {"inputs": {"base": str(base), "ft": str(ft), "t": str(t)},
              "steps": {"d": {"op": "diff", "ft": "ft", "base": "base"},
                        "moved": {"op": "transfer", "diff": "d", "to": "t"}},
              "output": {"step": "moved", "path": str(tmp_path / "chained")}}
    cli("run", write_recipe(tmp_path / "r.yaml", recipe))
    assert_same_bytes(tmp_path / "seq", tmp_path / "chained")


def test_lora_merge_and_adapter_inputs(llama, cli, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    pm = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(llama.base),
                             peft.LoraConfig(init_lora_weights=False, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    adapter = tmp_path / "adapter"
    pm.save_pretrained(adapter)
    args = ["lora", "merge", str(llama.base), str(adapter), "--scale", "0.5"]
    cli(*args, "-o", tmp_path / "direct")
    r = cli(*args, "-o", tmp_path / "replayed", "--print-recipe")
    (tmp_path / "r.yaml").write_text(r.output)
    cli("run", tmp_path / "r.yaml")
    assert_same_bytes(tmp_path / "direct", tmp_path / "replayed")
    # an adapter as a soup input, and as a fine-tune for a merge, inside a recipe
    cli("soup", adapter, llama.v1, "--base", llama.base, "-o", tmp_path / "soup")
    r = cli("soup", adapter, llama.v1, "--base", llama.base, "-o", tmp_path / "soup2", "--print-recipe")
    (tmp_path / "s.yaml").write_text(r.output)
    cli("run", tmp_path / "s.yaml")
    assert_same_bytes(tmp_path / "soup", tmp_path / "soup2")
    cli("merge", adapter, llama.v1, "--base", llama.base, "-o", tmp_path / "m")
    recipe = {"inputs": {"b": str(llama.base), "ad": str(adapter), "v1": str(llama.v1)},
              "steps": {"m": {"op": "task_arithmetic", "base": "b", "models": ["ad", "v1"]}},
              "output": {"step": "m", "path": str(tmp_path / "m2")}}
    cli("run", write_recipe(tmp_path / "m.yaml", recipe))
    assert_same_bytes(tmp_path / "m", tmp_path / "m2")


# -- validation ---------------------------------------------------------------------------------


def _fails(cli, tmp_path, recipe: dict, *expected: str) -> str:
    r = cli("run", write_recipe(tmp_path / "bad.yaml", recipe), "-o", tmp_path / "never", ok=False)
    msg = r.output.strip()
    assert msg.startswith("error:") and len(msg.splitlines()) == 1, msg
    for e in expected:
        assert e in msg, msg
    assert not (tmp_path / "never").exists()
    return msg


def test_misspelled_and_invalid_keys(zoo, cli, tmp_path):
    good = three_step(zoo, tmp_path / "out")

    def variant(edit):
        import copy

        data = copy.deepcopy(good)
        edit(data)
        return data

    _fails(cli, tmp_path, variant(lambda d: d["steps"]["scaled"].update(alhpa=0.5)),
           "step 'scaled': unknown parameter 'alhpa' (did you mean 'alpha'?)")
    _fails(cli, tmp_path, variant(lambda d: d["steps"]["final"].update(wieghts=[1, 1, 1])),
           "step 'final'", "'wieghts'", "did you mean 'weights'?")
    _fails(cli, tmp_path, variant(lambda d: d.update(stpes={})), "unknown key 'stpes'", "did you mean 'steps'?")
    _fails(cli, tmp_path, variant(lambda d: d["output"].update(dtpye="bf16")), "output", "did you mean 'dtype'?")
    _fails(cli, tmp_path, variant(lambda d: d["steps"]["moved"].update(op="tranfser")),
           "step 'moved'", "unknown op 'tranfser'", "did you mean 'transfer'?")
    _fails(cli, tmp_path, variant(lambda d: d["steps"]["scaled"].update(ft="movd")),
           "step 'scaled'", "'movd'", "neither an input nor a step", "did you mean 'moved'?")
    _fails(cli, tmp_path, variant(lambda d: d["steps"]["scaled"].update(alpha="half")),
           "step 'scaled'", "'alpha' must be a number")
    _fails(cli, tmp_path, variant(lambda d: d["steps"]["final"].update(normalize="yes")),
           "step 'final'", "'normalize' must be true or false")
    _fails(cli, tmp_path, variant(lambda d: d["steps"]["scaled"].pop("beta")), "step 'scaled'", "needs parameter 'beta'")
    _fails(cli, tmp_path, variant(lambda d: d["steps"]["moved"].update(to="final")), "cycle", "moved", "final")
    _fails(cli, tmp_path, variant(lambda d: d["output"].update(step="finale")), "did you mean 'final'?")
    _fails(cli, tmp_path, variant(lambda d: d["steps"].update(g={"op": "greedy_soup", "models": ["base_a"]})),
           "step 'g'", "'greedy_soup' cannot be chained")
    _fails(cli, tmp_path, variant(lambda d: d["steps"].update(g={"op": "sft_apply", "model": "base_a",
                                                                 "sfts": ["moved"]})),
           "step 'g'", "'moved', which is not an input")
    _fails(cli, tmp_path, variant(lambda d: d["steps"].update(
        m={"op": "merge", "method": "tie", "base": "base_a", "models": ["ft_a"]})), "step 'm'", "did you mean 'ties'?")
    _fails(cli, tmp_path, variant(lambda d: d["steps"]["moved"].pop("source_ft")), "step 'moved'", "--source-ft")


# -- memory: one pass, no extra model copy ---------------------------------------------------------

LAYERS, ROWS, COLS = 24, 256, 1024  # 4 tensors per layer of 1 MiB (float32): ~100 MiB per model


def _big_model(folder: Path, seed: int, like: dict | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(LAYERS):
        for part in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
            n = f"model.layers.{i}.{part}.weight"
            tensors[n] = (like[n] + 0.01 * torch.randn(ROWS, COLS, generator=g)) if like else \
                torch.randn(ROWS, COLS, generator=g)
    write_checkpoint(folder, tensors, {"model_type": "llama", "num_hidden_layers": LAYERS,
                                       "architectures": ["LlamaForCausalLM"]})
    return tensors


def _peak_rss_mib(args: list[str]) -> float:
    """Peak RSS of the CLI run in a child of a fresh wrapper process (so earlier runs do not count)."""
    code = ("import resource, subprocess, sys; "
            "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    cli = [sys.executable, "-c", "from surgery_cli.app import main; main()"]
    out = subprocess.run([sys.executable, "-c", code, *cli, *map(str, args)], check=True, capture_output=True,
                         text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    return int(out.stdout.split()[-1]) / 1024


def test_peak_memory_of_a_chain_is_that_of_one_operation(tmp_path):
    base_a = _big_model(tmp_path / "a", 1)
    _big_model(tmp_path / "a-ft", 2, like=base_a)
    del base_a
    _big_model(tmp_path / "b", 3)
    model_mib = LAYERS * 4 * ROWS * COLS * 4 / 2**20
    recipe = {"inputs": {"base_a": str(tmp_path / "a"), "ft_a": str(tmp_path / "a-ft"), "base_b": str(tmp_path / "b")},
              "steps": {"moved": {"op": "transfer", "source_base": "base_a", "source_ft": "ft_a", "to": "base_b"},
                        "scaled": {"op": "lines", "base": "base_b", "ft": "moved", "alpha": 0.5, "beta": 0.5},
                        "final": {"op": "soup", "models": ["scaled", "base_a", "ft_a"], "weights": [0.5, 0.25, 0.25]}},
              "output": {"step": "final"}}
    write_recipe(tmp_path / "r.yaml", recipe)
    single = _peak_rss_mib(["transfer", "--source-base", tmp_path / "a", "--source-ft", tmp_path / "a-ft",
                            "--to", tmp_path / "b", "-o", tmp_path / "t", "--device", "cpu", "-q"])
    chained = _peak_rss_mib(["run", tmp_path / "r.yaml", "-o", tmp_path / "c", "--device", "cpu", "-q"])
    print(f"peak RSS: single transfer {single:.0f} MiB, three-step recipe {chained:.0f} MiB, model {model_mib:.0f} MiB")
    assert chained < single + 0.5 * model_mib, (single, chained, model_mib)


def test_statistics_passes_run_on_the_recipes_device(zoo, tmp_path, monkeypatch):
    """A step's statistics (here TIES thresholds) are computed while the recipe is built, on the
    device `surgery run --device` names, not on the default."""
    import surgery.engine.stats as stats
    from surgery.recipes.graph import run_recipe

    seen, real = [], stats.tensor_topk_thresholds

    def recording(inputs, items, density, device="auto", *args, **kwargs):
        seen.append(device)
        return real(inputs, items, density, device, *args, **kwargs)

    monkeypatch.setattr(stats, "tensor_topk_thresholds", recording)
    recipe = {"inputs": {"base": str(zoo["llama/base"]), "a": str(zoo["llama/ft1"]), "b": str(zoo["llama/ft2"])},
              "steps": {"t": {"op": "ties", "base": "base", "models": ["a", "b"], "density": 0.3}},
              "output": {"step": "t", "path": str(tmp_path / "out")}}
    run_recipe(recipe, device="cpu")
    assert seen == ["cpu"]
