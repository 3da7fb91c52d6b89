"""Greedy soup: order and keep/reject decisions against an independent greedy run in memory."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import surgery
from surgery.errors import PlanError, ScoreError
from surgery_cli.app import app
from _support import assert_close_ulp, assert_no_output, load_model_state, read_folder, read_one, soup_reference

NORM = "model.norm.weight"  # the tensor the score looks at
# Offsets from the target given to NORM in each ingredient (in units of e1, e2). Ranked by their own
# score: A (1.0), B (1.1), C (1.2), D (1.5). Greedy from A: +B -> 1.05 worse, +C -> 0.1 better,
# +D -> 0.50 worse. So a rejection is followed by a keep, and the last one is rejected.
OFFSETS = {"A": (1.0, 0.0), "B": (1.1, 0.0), "C": (-1.2, 0.0), "D": (0.0, 1.5)}


@pytest.fixture(scope="module")
def ingredients(qwen2, tmp_path_factory):
    """Four fine-tuned Qwen2 variants whose final norm sits at designed points around a target."""
    from transformers import Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("greedy")
    sources = {"A": qwen2.v1, "B": qwen2.v2, "C": qwen2.v3, "D": qwen2.base}
    target = read_one(qwen2.base, NORM).clone()
    paths = {}
    for key, src in sources.items():
        m = Qwen2ForCausalLM.from_pretrained(src)
        offset = torch.zeros_like(target)
        offset[0], offset[1] = OFFSETS[key]
        with torch.no_grad():
            m.model.norm.weight.copy_(target + offset)
        m.save_pretrained(root / key)
        for p in src.iterdir():  # tokenizer files
            if not (root / key / p.name).exists() and p.is_file():
                (root / key / p.name).write_bytes(p.read_bytes())
        paths[key] = root / key
    return paths, target


def distance_score(target):
    def score(model: str) -> float:
        w = read_one(Path(model), NORM).to(torch.float64)
        return -float(torch.linalg.vector_norm(w - target.to(torch.float64)))
    return score


def independent_greedy(sources: list[str], target):
    """Greedy soup (Wortsman et al.) computed in memory on the scored tensor alone."""
    score = distance_score(target)
    tensors = {s: read_one(Path(s), NORM) for s in sources}

    def score_tensor(t):
        return -float(torch.linalg.vector_norm(t.to(torch.float64) - target.to(torch.float64)))

    own = {s: score(s) for s in sources}
    ranked = sorted(sources, key=lambda s: own[s], reverse=True)
    chosen, best = [ranked[0]], own[ranked[0]]
    steps = [(list(chosen), best, True)]
    for s in ranked[1:]:
        cand = chosen + [s]
        soup_t = soup_reference([tensors[c] for c in cand], [1 / len(cand)] * len(cand), torch.float32)
        sc = score_tensor(soup_t)
        kept = sc > best
        steps.append((cand, sc, kept))
        if kept:
            chosen, best = cand, sc
    return own, chosen, steps, best


def assert_uniform_soup_of(out: Path, chosen: list[str], like: str):
    n = len(chosen)
    states = [load_model_state(c)[0] for c in chosen]
    state, info, _ = load_model_state(out, cache=False)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for k, v in state.items():
        expected = soup_reference([s[k] for s in states], [1 / n] * n, v.dtype) if n > 1 else states[0][k]
        assert_close_ulp(v, expected, 1, k)


def test_greedy_soup_matches_independent_greedy(ingredients, tmp_path):
    paths, target = ingredients
    sources = [str(paths[k]) for k in ("C", "A", "D", "B")]  # not in rank order
    own, chosen, steps, best = independent_greedy(sources, target)
    # the design gives both decisions, and a keep after a rejection
    assert [k for _, _, k in steps] == [True, False, True, False]
    calls = []
    score = distance_score(target)

    def recording_score(model):
        calls.append(model)
        return score(model)

    out = tmp_path / "greedy"
    logs = []
    result = surgery.greedy_soup(sources, out, score=recording_score, log=logs.append)
    assert isinstance(result, surgery.GreedySoupResult)
    assert Path(result.output) == out.resolve()
    assert result.chosen == chosen == [str(paths["A"]), str(paths["C"])]
    assert result.ingredient_scores == pytest.approx(own, rel=1e-12)
    assert [s["ingredients"] for s in result.steps] == [c for c, _, _ in steps]
    assert [s["kept"] for s in result.steps] == [k for _, _, k in steps]
    assert [s["score"] for s in result.steps] == pytest.approx([s for _, s, _ in steps], rel=1e-6, abs=1e-9)
    assert result.score == pytest.approx(best, rel=1e-6, abs=1e-9)
    # every ingredient scored alone once, then one candidate per remaining ingredient
    assert calls[:4] == sources and len(calls) == 4 + 3
    assert all(c not in sources for c in calls[4:])
    assert any("rejected" in m for m in logs) and any("kept" in m for m in logs)
    # the output is the uniform soup of the kept ingredients, every tensor
    assert_uniform_soup_of(out, chosen, sources[0])
    assert_close_ulp(read_one(out, NORM),
                     soup_reference([read_one(Path(c), NORM) for c in chosen], [0.5, 0.5], torch.float32), 1)
    record = json.loads((out / "surgery_recipe.json").read_text())
    assert record["recipe"]["operation"] == "greedy_soup"
    assert record["recipe"]["chosen"] == chosen
    assert (out / "README.md").exists() and (out / "config.json").exists()
    # nothing left of the candidates
    assert sorted(p.name for p in tmp_path.iterdir()) == ["greedy"]


def test_greedy_keeps_best_ingredient_alone(ingredients, tmp_path):
    paths, target = ingredients
    sources = [str(paths["B"]), str(paths["A"])]  # A ranks first; +B is worse
    own, chosen, steps, best = independent_greedy(sources, target)
    assert chosen == [str(paths["A"])]
    out = tmp_path / "alone"
    result = surgery.greedy_soup(sources, out, score=distance_score(target))
    assert result.chosen == chosen and [s["kept"] for s in result.steps] == [True, False]
    assert result.score == pytest.approx(own[str(paths["A"])])
    got, a = read_folder(out), read_folder(paths["A"])
    assert set(got) == set(a)
    for k in a:
        assert torch.equal(got[k], a[k]), k
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alone"]


SCORE_PY = r"""
import sys
import numpy as np
from safetensors import safe_open

print("loading", sys.argv[1])
with safe_open(sys.argv[1] + "/model.safetensors", "np") as f:
    w = f.get_tensor("model.norm.weight").astype(np.float64)
target = np.array({target}, dtype=np.float64)
print("accuracy 0.5 (a number that is not the last line)")
print(-float(np.linalg.norm(w - target)))
"""


def test_greedy_through_cli(ingredients, tmp_path):
    paths, target = ingredients
    script = tmp_path / "score.py"
    script.write_text(SCORE_PY.replace("{target}", repr(target.tolist())))
    sources = [str(paths[k]) for k in ("D", "B", "A", "C")]
    _, chosen, steps, best = independent_greedy(sources, target)
    out = tmp_path / "cli-greedy"
    cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {{model}}"
    result = CliRunner().invoke(app, ["soup", *sources, "-o", str(out), "--greedy", "--score-cmd", cmd, "-q"])
    assert result.exit_code == 0, result.output
    assert f"greedy soup of {len(chosen)} ingredient(s)" in result.stdout
    assert ", ".join(chosen) in result.stdout
    assert result.stderr.count("rejected") == 2 and result.stderr.count(" kept") == 1
    record = json.loads((out / "surgery_recipe.json").read_text())["recipe"]
    assert record["chosen"] == chosen
    assert [s["kept"] for s in record["steps"]] == [k for _, _, k in steps]
    assert record["score"] == pytest.approx(best, rel=1e-6, abs=1e-9)
    assert_uniform_soup_of(out, chosen, sources[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli-greedy", "score.py"]


@pytest.mark.parametrize("printed", ["no number here", "", "score: 3"])
def test_score_command_without_number(ingredients, tmp_path, printed):
    paths, _ = ingredients
    script = tmp_path / "bad.py"
    script.write_text(f"print('working...')\nprint({printed!r})\n")
    out = tmp_path / "out"
    cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {{model}}"
    result = CliRunner().invoke(app, ["soup", str(paths["A"]), str(paths["B"]), "-o", str(out),
                                      "--greedy", "--score-cmd", cmd, "-q"])
    assert result.exit_code != 0
    assert "printed no number" in result.stderr and str(paths["A"]) in result.stderr
    assert_no_output(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.py"]
    with pytest.raises(ScoreError):
        surgery.greedy_soup([str(paths["A"]), str(paths["B"])], out, score=surgery.score_command(cmd))
    assert_no_output(out)


def test_score_command_failing_or_malformed(ingredients, tmp_path):
    paths, _ = ingredients
    fail = surgery.score_command(f"{shlex.quote(sys.executable)} -c 'import sys; sys.exit(\"boom\")' {{model}}")
    with pytest.raises(ScoreError, match="exited 1") as e:
        fail(str(paths["A"]))
    assert "boom" in str(e.value)
    with pytest.raises(PlanError, match="{model}"):
        surgery.score_command("python eval.py")
    ok = surgery.score_command(f"{shlex.quote(sys.executable)} -c 'import sys; print(len(sys.argv[1]))' {{model}}")
    weird = tmp_path / "a dir with spaces; and $chars"
    assert ok(str(weird)) == float(len(str(weird)))  # the location is passed as one quoted word


def test_greedy_score_failing_midway_leaves_nothing(ingredients, tmp_path):
    paths, target = ingredients
    score = distance_score(target)
    calls = []

    def flaky(model):
        calls.append(model)
        if len(calls) == 4:  # the second candidate soup
            raise ScoreError("evaluation crashed")
        return score(model)

    out = tmp_path / "out"
    with pytest.raises(ScoreError):
        surgery.greedy_soup([str(paths[k]) for k in "ABC"], out, score=flaky)
    assert_no_output(out)
    assert list(tmp_path.iterdir()) == []


def test_greedy_cli_option_rules(ingredients, tmp_path):
    paths, _ = ingredients
    run = CliRunner().invoke
    out = str(tmp_path / "o")
    r = run(app, ["soup", str(paths["A"]), str(paths["B"]), "-o", out, "--greedy"])
    assert r.exit_code != 0 and "--score-cmd" in r.stderr
    r = run(app, ["soup", str(paths["A"]), str(paths["B"]), "-o", out, "--score-cmd", "x {model}"])
    assert r.exit_code != 0 and "--greedy" in r.stderr
    r = run(app, ["soup", str(paths["A"]), str(paths["B"]), "-o", out, "--greedy", "--score-cmd", "x {model}",
                  "--weights", "1,2"])
    assert r.exit_code != 0 and "--weights" in r.stderr
    assert_no_output(tmp_path / "o")
