#!/usr/bin/env python
"""Benchmark: task arithmetic, TIES and fine-tuning transfer on three Llama-style bf16 checkpoints.

The checkpoints are bench_soup's (same builder, same cache under ``benchmarks/_work/models``): model 0
is the base, models 1 and 2 its fine-tunes. For the transfer, the source base is model 0, the source
fine-tune model 1 and the target model 2. At each model size, in separate subprocesses, interleaved
within each repetition, on the same warm page cache (bench_soup's runner, warming and I/O floor):

* ``surgery transfer --source-base m0 --source-ft m1 --to m2``: ``m2 + (m1 - m0)``;
* ``surgery merge m1 m2 --base m0 --method task_arithmetic``: ``m0 + (m1 - m0) + (m2 - m0)``;
* mergekit ``task_arithmetic`` of the same (base m0, models m1 and m2, weight 1.0 each, bfloat16).
  With unit weights this is the same function as the transfer, ``m1 + m2 - m0``, over the same input
  bytes: the like-for-like peer of both surgery rows. Also mergekit ``task_arithmetic`` of m1 alone
  onto m0 (one task vector, as a transfer applies, but 2 inputs read instead of 3);
* ``surgery merge ... --method ties --density 0.2`` with ``--scope tensor`` and ``--scope global``,
  and mergekit ``ties`` (density 0.2, weight 1.0) for reference;
* the I/O floor of each: a bare process reading every input byte the tool reads (three models; two
  for mergekit's one-model task arithmetic; three models three times for global TIES, which streams
  its inputs in three passes) and writing one model-sized file.

Correctness in the same run: every tensor of surgery's outputs against independent float64
references computed here with safetensors and numpy (the transfer against ``m2 + (m1 - m0)`` cast
once to bf16; TIES per tensor and global against the disjoint mean of the trimmed float64 task
vectors, with the global thresholds re-counted), and surgery's task arithmetic against mergekit's,
in bf16 units in the last place.

Results go to ``benchmarks/results/task-vectors-<scale>.json`` and markdown tables are printed.

    python benchmarks/bench_task_vectors.py                 # full size: 309.6M parameters
    python benchmarks/bench_task_vectors.py --scale small   # ~20M parameters, a quick end-to-end check
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_soup as bs  # noqa: E402  (one model builder, one runner, one floor)

HERE = bs.HERE
DENSITY = 0.2


# --------------------------------------------------------------------------------------------
# The tools
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tool:
    key: str
    kind: str  # "floor", "surgery" or "mergekit"
    what: str  # one line for the table
    reads: tuple[int, ...] = (0, 1, 2)  # which models it reads
    passes: int = 1  # how many times it reads them
    floor: str | None = None  # the floor row it is compared with
    fsync: bool = True  # floors only


FLOORS = {
    "io-floor": Tool("io-floor", "floor", "read m0 m1 m2, write 1 model, fsync"),
    "io-floor-nofsync": Tool("io-floor-nofsync", "floor", "read m0 m1 m2, write 1 model, no fsync", fsync=False),
    "io-floor-2in": Tool("io-floor-2in", "floor", "read m0 m1, write 1 model, fsync", reads=(0, 1)),
    "io-floor-3pass": Tool("io-floor-3pass", "floor", "read m0 m1 m2 three times, write 1 model, fsync", passes=3),
}
TOOLS = {
    "surgery-transfer": Tool("surgery-transfer", "surgery", "transfer: m2 + (m1 - m0)", floor="io-floor"),
    "surgery-ta": Tool("surgery-ta", "surgery", "task_arithmetic: m0 + tau1 + tau2", floor="io-floor"),
    "mergekit-ta": Tool("mergekit-ta", "mergekit", "task_arithmetic: m0 + tau1 + tau2", floor="io-floor"),
    "mergekit-ta1": Tool("mergekit-ta1", "mergekit", "task_arithmetic: m0 + tau1 (one vector)", reads=(0, 1),
                         floor="io-floor-2in"),
    "surgery-ties-tensor": Tool("surgery-ties-tensor", "surgery", f"ties density {DENSITY}, per-tensor top-k",
                                floor="io-floor"),
    "surgery-ties-global": Tool("surgery-ties-global", "surgery", f"ties density {DENSITY}, global top-k (3 passes)",
                                passes=3, floor="io-floor-3pass"),
    "mergekit-ties": Tool("mergekit-ties", "mergekit", f"ties density {DENSITY}, per-tensor top-k", floor="io-floor"),
}


def choose_tools(only: str | None, with_mergekit: bool) -> list[Tool]:
    """The rows to time, floors first (only the floors some chosen tool is compared with)."""
    keys = list(TOOLS) if not only else [k.strip() for k in only.split(",") if k.strip()]
    unknown = [k for k in keys if k not in TOOLS and k not in FLOORS]
    if unknown:
        raise SystemExit(f"--only: unknown tools {unknown}; choose from {', '.join([*FLOORS, *TOOLS])}")
    tools = [TOOLS[k] for k in TOOLS if k in keys and (with_mergekit or TOOLS[k].kind != "mergekit")]
    floors = {t.floor for t in tools} | {k for k in keys if k in FLOORS}
    if any(t.kind == "mergekit" and t.floor == "io-floor" for t in tools):
        floors.add("io-floor-nofsync")  # mergekit never syncs: show what that saves
    return [f for k, f in FLOORS.items() if k in floors] + tools


def command(tool: Tool, models: list[Path], out: Path, shard: str, work: Path, args) -> list[str]:
    m0, m1, m2 = map(str, models)
    common = ["-o", str(out), "--max-shard-size", shard, "--device", "cpu", "-q"]
    if tool.kind == "floor":
        dirs = [models[i] for i in tool.reads] * tool.passes
        return bs.floor_command(dirs, out, model_bytes(models[0]), tool.fsync)
    if tool.key == "surgery-transfer":
        return [bs.executable("surgery"), "transfer", "--source-base", m0, "--source-ft", m1, "--to", m2, *common]
    if tool.key == "surgery-ta":
        return [bs.executable("surgery"), "merge", m1, m2, "--base", m0, "--method", "task_arithmetic", *common]
    if tool.key.startswith("surgery-ties-"):
        scope = tool.key.rsplit("-", 1)[1]
        return [bs.executable("surgery"), "merge", m1, m2, "--base", m0, "--method", "ties", "--density",
                str(args.density), "--scope", scope, *common]
    if tool.kind == "mergekit":
        method = "ties" if tool.key == "mergekit-ties" else "task_arithmetic"
        params = ["      weight: 1.0"] + ([f"      density: {args.density}"] if method == "ties" else [])
        lines = [f"merge_method: {method}", f"base_model: {m0}", "dtype: bfloat16", "models:"]
        for i in tool.reads[1:]:
            lines += [f"  - model: {models[i]}", "    parameters:", *params]
        config = work / f"{tool.key}.yml"
        config.write_text("\n".join(lines) + "\n")
        return bs.mergekit_command(config, out, shard, args.mergekit_arg)
    raise ValueError(tool.key)


def model_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


# --------------------------------------------------------------------------------------------
# Correctness: independent float64 references
# --------------------------------------------------------------------------------------------

CHUNK = 1 << 22  # elements per slice of a tensor in the check: bounds its float64 temporaries


def kth_largest_delta(ft, base, k: int) -> float:
    """The k-th largest ``|ft - base|`` in float64 (exact for bf16 inputs), with numpy's partition (not
    torch's kthvalue, which surgery uses), built slice by slice and partitioned in place."""
    import numpy as np
    import torch

    ft, base = ft.reshape(-1), base.reshape(-1)
    mag = torch.empty(ft.numel(), dtype=torch.float64)
    for s in range(0, ft.numel(), CHUNK):
        torch.sub(ft[s:s + CHUNK].to(torch.float64), base[s:s + CHUNK].to(torch.float64), out=mag[s:s + CHUNK])
        mag[s:s + CHUNK].abs_()
    flat = mag.numpy()
    flat.partition(flat.size - k)
    return float(np.float64(flat[flat.size - k]))


def ties_reference(base, deltas, masks):
    """base + the disjoint mean of the kept entries: elect the sign of the sum of the kept entries
    (ties to +), average the kept entries that carry it (weights are all 1), cast once to bf16."""
    import torch

    kept = [torch.where(m, d, 0.0) for d, m in zip(deltas, masks)]
    total = kept[0].clone()
    for k in kept[1:]:
        total += k
    elected = torch.where(total >= 0, 1.0, -1.0).to(torch.float64)
    merged = torch.zeros_like(total)
    count = torch.zeros_like(total)
    for k in kept:
        agree = torch.sign(k) == elected
        merged += torch.where(agree, k, 0.0)
        count += agree
    count[count == 0] = 1
    return (base.to(torch.float64) + merged / count).to(torch.bfloat16)


def global_thresholds(folder: Path) -> list[float] | None:
    try:
        return json.loads((folder / "surgery_recipe.json").read_text())["recipe"]["thresholds"]
    except (OSError, ValueError, KeyError):
        return None


COMPARISONS = {  # label: (output, what it is compared with: another output, or a reference computed here)
    "surgery-transfer vs float64 ref": ("surgery-transfer", "ref"),
    "surgery-ta vs float64 ref": ("surgery-ta", "ref"),
    "surgery-ta vs mergekit-ta": ("surgery-ta", "mergekit-ta"),
    "mergekit-ta vs float64 ref": ("mergekit-ta", "ref"),
    "surgery-transfer vs mergekit-ta": ("surgery-transfer", "mergekit-ta"),
    "mergekit-ta1 vs float64 ref (= m1)": ("mergekit-ta1", "ref1"),
    "surgery-ties-tensor vs float64 ties ref": ("surgery-ties-tensor", "ties-ref"),
    "surgery-ties-tensor vs mergekit-ties": ("surgery-ties-tensor", "mergekit-ties"),
    "mergekit-ties vs float64 ties ref": ("mergekit-ties", "ties-ref"),
    "surgery-ties-global vs float64 ties ref": ("surgery-ties-global", "ties-global-ref"),
}


def check_correctness(models: list[Path], outs: dict[str, Path], shard_limit: int, density: float) -> dict:
    """Every tensor of each output against the references below, in bf16 ulps (bench_soup.UlpStats).

    ref: ``m2 + (m1 - m0)`` in float64 (exact for bf16 inputs), cast once to bf16: the transfer, and,
    with unit weights, task arithmetic ``m0 + (m1 - m0) + (m2 - m0)`` too (correctly rounded).
    ties ref: per tensor, each float64 task vector keeps the entries whose magnitude is at least its
    ``max(1, int(density * numel))``-th largest (ties at the threshold kept), then the disjoint mean
    (:func:`ties_reference`). ties global ref: the same with the thresholds surgery recorded in its
    recipe, each re-counted here over the whole model: the float32 magnitudes at or above it reach
    the keep count, those strictly above do not.
    """
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.perf_counter()
    ins = [bs.Folder(p) for p in models]
    names = ins[0].names()
    got = {k: bs.Folder(p) for k, p in outs.items() if p.is_dir()}
    res: dict = {"outputs": {k: {"names_match_inputs": f.names() == names, "shards": bs.shard_report(f, shard_limit)}
                             for k, f in got.items()}}
    thr = global_thresholds(outs["surgery-ties-global"]) if "surgery-ties-global" in got else None
    available = set(got) | {"ref", "ref1", "ties-ref"} | ({"ties-global-ref"} if thr else set())
    stats = {label: bs.UlpStats() for label, (a, b) in COMPARISONS.items() if a in got and b in available}
    wanted = {b for label, (_, b) in COMPARISONS.items() if label in stats}
    total_numel = 0
    at_or_above, above = [0, 0], [0, 0]
    kept_beyond_k = 0  # per-tensor top-k: entries tied with the k-th largest that are kept beyond k
    bad = []
    for name in sorted(names):
        xs = [f.get(name) for f in ins]
        if not xs[0].is_floating_point():
            continue
        numel = xs[0].numel()
        total_numel += numel
        values = {}
        for k, f in got.items():
            if name in f.weight_map:
                t = f.get(name)
                if t.dtype != torch.bfloat16 or t.shape != xs[0].shape:
                    bad.append(f"{k}:{name}")
                else:
                    values[k] = t.reshape(-1)
        if "ties-ref" in wanted:
            k = max(1, int(density * numel)) if density < 1 else numel
            tensor_thr = [kth_largest_delta(xs[t], xs[0], k) if density < 1 else -1.0 for t in (1, 2)]
            kept_beyond_k -= 2 * k
        flat = [x.reshape(-1) for x in xs]
        for s in range(0, numel, CHUNK):
            x = [f[s:s + CHUNK] for f in flat]
            d = [x[1].to(torch.float64) - x[0].to(torch.float64), x[2].to(torch.float64) - x[0].to(torch.float64)]
            refs = {"ref": (x[2].to(torch.float64) + d[0]).to(torch.bfloat16), "ref1": x[1]}
            if "ties-ref" in wanted:
                masks = [dt.abs() >= tt for dt, tt in zip(d, tensor_thr)]
                kept_beyond_k += sum(int(m.sum()) for m in masks)
                refs["ties-ref"] = ties_reference(x[0], d, masks)
            if thr:
                mag32 = [dt.abs().to(torch.float32) for dt in d]
                masks = [m >= th for m, th in zip(mag32, thr)]
                for t in range(2):
                    at_or_above[t] += int(masks[t].sum())
                    above[t] += int((mag32[t] > thr[t]).sum())
                refs["ties-global-ref"] = ties_reference(x[0], d, masks)
            for label, st in stats.items():
                a, b = COMPARISONS[label]
                if a in values and (b in values or b in refs):
                    st.add(name, values[a][s:s + CHUNK], values[b][s:s + CHUNK] if b in values else refs[b], x)
            del d, refs
        del xs, values, flat
    res["comparisons"] = {k: v.result() for k, v in stats.items() if v.total}
    if "ties-ref" in wanted:
        res["tensor_topk_kept_beyond_k"] = kept_beyond_k
    if thr:
        keep = max(1, int(density * total_numel))
        res["global_thresholds"] = {"thresholds": thr, "keep": keep, "at_or_above": at_or_above,
                                    "strictly_above": above,
                                    "ok": all(a >= keep > b for a, b in zip(at_or_above, above))}
    res["bad_dtype_or_shape"] = bad
    res["check_s"] = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def run_size(args, cfg: dict, mult: int, work: Path, tools: list[Tool]) -> dict:
    cfg, root, key, size = bs.prepare_models(args, cfg, mult, work / "models")
    shard = args.shard_size or cfg["shard"]
    shard_bytes = bs.parse_size(shard)
    models = bs.model_dirs(root)
    files = bs.input_files(models)
    size["input_bytes_each"] = model_bytes(models[0])
    outs = work / "out-task-vectors" / key
    outs.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    samples: dict[str, list[dict]] = {t.key: [] for t in tools}
    for rep in range(args.repeat):
        for tool in tools:
            out = outs / (tool.key + (".bin" if tool.kind == "floor" else ""))
            cmd = command(tool, models, out, shard, work, args)
            if tool.kind != "floor":
                size.setdefault("commands", {})[tool.key] = cmd
            r = bs.timed(cmd, [out], files, logs / f"tv-{key}-{tool.key}-{rep}.log", args.threads)
            samples[tool.key].append(r)
            bs.log(f"x{mult} rep {rep + 1}/{args.repeat} {tool.key:20s} {r['wall_s']:7.2f}s  {r['peak_rss_mb']:8.1f} MB")
        for p in outs.glob("*.bin"):
            p.unlink()
    size["runs"] = samples
    size["summary"] = {t.key: bs.summarize(samples[t.key]) for t in tools}
    if not args.no_check and (mult == bs.mults_checked(args) or args.check_every_size):
        bs.log("checking correctness")
        produced = {t.key: outs / t.key for t in tools if t.kind != "floor"}
        size["correctness"] = check_correctness(models, produced, shard_bytes, args.density)
        if not args.no_load_check and "surgery-transfer" in produced:
            size["correctness"]["transfer_output_loads_in_transformers"] = \
                bs.check_loads_in_transformers(produced["surgery-transfer"])
        bs.log(f"correctness checked in {size['correctness']['check_s']:.1f}s")
    if not args.keep:
        shutil.rmtree(outs, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    return size


RATIOS = [  # (label, numerator, denominator, target as (op, value) or None)
    ("mergekit-ta / surgery-ta (wall)", "mergekit-ta", "surgery-ta", (">=", 3.0)),
    ("mergekit-ta / surgery-transfer (wall; same function and input bytes)", "mergekit-ta", "surgery-transfer",
     (">=", 3.0)),
    ("mergekit-ta1 / surgery-transfer (wall; mergekit reads 2 models, surgery 3)", "mergekit-ta1",
     "surgery-transfer", None),
    ("mergekit-ties / surgery-ties-tensor (wall)", "mergekit-ties", "surgery-ties-tensor", None),
    ("surgery-ties-global / surgery-ties-tensor (wall)", "surgery-ties-global", "surgery-ties-tensor", ("<=", 2.0)),
]


def verdict(value: float, target) -> str:
    if target is None:
        return ""
    op, limit = target
    return "PASS" if (value >= limit if op == ">=" else value <= limit) else "FAIL"


def targets(result: dict) -> dict:
    out = {}
    sizes = result["sizes"]
    for size in sizes:
        sm = size["summary"]
        tag = f"x{size['layer_multiplier']}"
        for label, a, b, target in RATIOS:
            if a in sm and b in sm and target:
                v = sm[a]["wall_s"] / sm[b]["wall_s"]
                out[f"{tag} {label} (target {target[0]} {target[1]:g})"] = f"{v:.2f}x {verdict(v, target)}"
        for key, s in sm.items():
            if key.startswith("surgery"):
                rss = s["peak_rss_mb"]
                out[f"{tag} {key} peak RSS (target < 1000 MB)"] = f"{rss:.0f} MB {'PASS' if rss < 1000 else 'FAIL'}"
    if len(sizes) >= 2:
        first, last = sizes[0]["summary"], sizes[-1]["summary"]
        for key in first:
            if key.startswith("surgery") and key in last:
                a, b = first[key]["peak_rss_mb"], last[key]["peak_rss_mb"]
                flat = b / a <= 1.10 or b - a <= 50
                out[f"{key} peak RSS x{sizes[-1]['layer_multiplier']} / x{sizes[0]['layer_multiplier']} "
                    f"(target flat: <= 1.10 or <= +50 MB)"] = f"{b / a:.3f} ({b - a:+.0f} MB) {'PASS' if flat else 'FAIL'}"
    for size in sizes:
        c = size.get("correctness")
        if not c:
            continue
        tag = f"x{size['layer_multiplier']}"
        valid = all(o["names_match_inputs"] and not o["shards"]["over_limit"]
                    for k, o in c["outputs"].items() if k.startswith("surgery")) and \
            not [b for b in c["bad_dtype_or_shape"] if b.startswith("surgery")] and \
            c.get("transfer_output_loads_in_transformers", {"ok": True})["ok"]
        loads = ", transfer loads in transformers" if "transfer_output_loads_in_transformers" in c else ""
        out[f"{tag} surgery outputs valid (names, bf16, shapes, shard limit{loads})"] = \
            "PASS" if valid else "FAIL"
        cmp = c["comparisons"]
        for label in ("surgery-transfer vs float64 ref", "surgery-ta vs float64 ref",
                      "surgery-ties-tensor vs float64 ties ref", "surgery-ties-global vs float64 ties ref"):
            if label in cmp:
                u = cmp[label]
                out[f"{tag} {label}: bit-exact"] = \
                    f"max {u['max_ulp']} ulp, {u['exact_fraction']:.6f} exact {'PASS' if u['max_ulp'] == 0 else 'FAIL'}"
        if "global_thresholds" in c:
            g = c["global_thresholds"]
            out[f"{tag} surgery-ties-global thresholds keep exactly the top {g['keep']} per task vector"] = \
                "PASS" if g["ok"] else f"FAIL (at or above {g['at_or_above']}, above {g['strictly_above']})"
        if "tensor_topk_kept_beyond_k" in c:
            out[f"{tag} per-tensor top-k: entries tied at the threshold kept beyond k (report; mergekit keeps "
                "exactly k)"] = str(c["tensor_topk_kept_beyond_k"])
        if "surgery-ta vs mergekit-ta" in cmp:
            u = cmp["surgery-ta vs mergekit-ta"]
            out[f"{tag} surgery-ta vs mergekit-ta (report)"] = \
                f"max {u['max_ulp']} ulp, {u['exact_fraction']:.6f} identical"
    return out


def tables(result: dict) -> str:
    lines = ["| size | tool | computes | wall s | peak RSS MB | CPU s | floor | wall / floor |",
             "| --- | --- | --- | ---: | ---: | ---: | --- | ---: |"]
    every = {**FLOORS, **TOOLS}
    for size in result["sizes"]:
        sm = size["summary"]
        label = f"{size['params'] / 1e6:.0f}M ({size['config']['layers']}L)"
        for key, s in sm.items():
            tool = every[key]
            spread = f" ({s['wall_min_s']:.2f}-{s['wall_max_s']:.2f})" if s["n"] > 1 else ""
            floor = sm.get(tool.floor, {}).get("wall_s") if tool.floor else None
            lines.append(f"| {label} | {key} | {tool.what} | {s['wall_s']:.2f}{spread} | {s['peak_rss_mb']:.0f} | "
                         f"{s['cpu_s']:.2f} | {tool.floor or '-'} | {bs.ratio(s['wall_s'], floor)} |")
    ratios = []
    for size in result["sizes"]:
        sm = size["summary"]
        label = f"{size['params'] / 1e6:.0f}M ({size['config']['layers']}L)"
        for what, a, b, target in RATIOS:
            if a in sm and b in sm:
                v = sm[a]["wall_s"] / sm[b]["wall_s"]
                t = f"{target[0]} {target[1]:g}: {verdict(v, target)}" if target else "-"
                ratios.append(f"| {label} | {what} | {v:.2f} | {t} |")
    if ratios:
        lines += ["", "| size | ratio | value | target |", "| --- | --- | ---: | --- |", *ratios]
    lines += bs.baseline_lines(result)
    checks = [(s, s.get("correctness")) for s in result["sizes"] if s.get("correctness")]
    if checks:
        lines += bs.CORRECTNESS_HEADER
        for size, c in checks:
            label = f"{size['params'] / 1e6:.0f}M ({size['config']['layers']}L)"
            for what, u in c["comparisons"].items():
                lines.append(f"| {label} | {what} | {u['max_ulp']} | {u['exact_fraction']:.6f} | "
                             f"{u['within_1ulp_fraction']:.6f} | {u['max_abs_diff']:.3g} | "
                             f"{u['max_err_in_input_ulps']:.3g} | {u['worst_tensor'] if u['max_ulp'] else '-'} |")
    t = result.get("targets")
    if t:
        lines += [""] + [f"- {k}: {v}" for k, v in t.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(bs.SCALES), default="full",
                    help="full: 309.6M parameters at 1x (default); small: ~20M, a quick end-to-end check")
    ap.add_argument("--layers", default="1",
                    help="layer-count multipliers to run, comma-separated (default 1; 1,2 also checks that peak "
                         "memory stays flat at twice the depth)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="timed runs of each tool per size; the median wall is reported (default: 3 full, 1 small)")
    ap.add_argument("--shard-size", default=None, help="input and output shard size (default: 200MB full, 10MB small)")
    ap.add_argument("--density", type=float, default=DENSITY, help=f"TIES density (default {DENSITY})")
    ap.add_argument("--only", default=None,
                    help="comma-separated tools to time (default all): " + ", ".join(TOOLS) +
                         "; the floors they are compared with are added")
    ap.add_argument("--skip-mergekit", action="store_true", help="do not run mergekit (automatic when not installed)")
    ap.add_argument("--keep", action="store_true",
                    help="reuse checkpoints cached under the work folder (shared with bench_soup.py), and leave "
                         "checkpoints and outputs there")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    ap.add_argument("--check-every-size", action="store_true",
                    help="check correctness at every size (default: only the first)")
    bs.add_shared_args(ap)
    bs.add_output_args(ap, "task-vectors")
    args = ap.parse_args(argv)
    mults, with_mergekit = bs.finish_args(args)
    tools = choose_tools(args.only, with_mergekit)
    if importlib.util.find_spec("psutil") is None:
        bs.log("psutil is not installed: only wait4's ru_maxrss is reported")

    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "task-vectors", "scale": args.scale,
              "date": _dt.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv[1:],
              "roles": {"base": "m0", "fine-tunes": ["m1", "m2"], "transfer": {"source_base": "m0", "source_ft": "m1",
                                                                              "target": "m2"}},
              "density": args.density, "repeat": args.repeat, "tools": [t.key for t in tools],
              "env": bs.versions(), "sizes": []}
    if not args.no_baselines:
        result["baselines"] = bs.baselines(work, with_mergekit, args.threads)
    for mult in mults:
        result["sizes"].append(run_size(args, bs.SCALES[args.scale], mult, work, tools))
    result["mergekit_configs"] = {t.key: (work / f"{t.key}.yml").read_text() for t in tools if t.kind == "mergekit"}
    result["targets"] = targets(result)

    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{args.name or 'task-vectors-' + args.scale}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(tables(result))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
