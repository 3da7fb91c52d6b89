#!/usr/bin/env python
"""Benchmark: a uniform linear soup of three Llama-style bf16 checkpoints.

One run builds (or, with ``--keep``, reuses) three sharded checkpoints under ``benchmarks/_work/``,
then, at each model size (the layer count times 1 and times 2 by default), times in separate
subprocesses:

* ``surgery soup`` (the CLI),
* mergekit's ``linear`` merge (``mergekit-yaml``) on the same inputs, equal weights, bfloat16, same
  output shard size,
* the I/O floor: a bare Python process that reads every input byte and writes one output-sized file
  (once with an fsync at the end, as surgery does, and once without, as mergekit does).

Before every timed run the previous output is deleted, dirty pages are flushed (``sync``) and every
input byte is read once, so each tool starts with the same warm page cache. A small runner process
starts each tool, times it, and takes its own ``ru_maxrss`` from ``os.wait4`` (which also covers any
descendant it waited for) and, with psutil, the largest sum of RSS over the live process tree.

Correctness is checked in the same run: surgery's output against an independent reference (the
weighted mean of the inputs computed from safetensors in float32, cast once to bf16; and the same in
float64), and against mergekit's output, in bf16 units in the last place.

Results go to ``benchmarks/results/<name>.json`` and a markdown table is printed.

    python benchmarks/bench_soup.py                 # full size: ~309M parameters, then 2x layers
    python benchmarks/bench_soup.py --scale small   # ~20M parameters, a quick end-to-end check
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUILDER_VERSION = 1  # bump when the generated weights change, so cached checkpoints are rebuilt

# Llama-style shapes. full: 309.6M parameters (619 MB, 590 MiB in bf16) at 1x, 553.7M at 2x; small: 19.6M.
SCALES = {
    "full": dict(hidden=1024, intermediate=2816, heads=16, kv_heads=16, vocab=32000, layers=19, shard="200MB"),
    "small": dict(hidden=256, intermediate=704, heads=8, kv_heads=8, vocab=32000, layers=4, shard="10MB"),
}
N_MODELS = 3
INIT_STD = 0.02
PERTURB = 0.25  # each ingredient = base + PERTURB * INIT_STD * its own noise (a "fine-tune" of the base)

ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
           TOKENIZERS_PARALLELISM="false")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_size(text: str) -> int:
    units = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for u in sorted(units, key=len, reverse=True):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    return int(t)


# --------------------------------------------------------------------------------------------
# Building the checkpoints
# --------------------------------------------------------------------------------------------

def tensor_specs(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) in the order transformers saves a LlamaForCausalLM state dict."""
    h, i, v = cfg["hidden"], cfg["intermediate"], cfg["vocab"]
    head_dim = h // cfg["heads"]
    kv = cfg["kv_heads"] * head_dim
    specs = [("model.embed_tokens.weight", (v, h), "w")]
    for layer in range(cfg["layers"]):
        p = f"model.layers.{layer}."
        specs += [
            (p + "self_attn.q_proj.weight", (h, h), "w"),
            (p + "self_attn.k_proj.weight", (kv, h), "w"),
            (p + "self_attn.v_proj.weight", (kv, h), "w"),
            (p + "self_attn.o_proj.weight", (h, h), "w"),
            (p + "mlp.gate_proj.weight", (i, h), "w"),
            (p + "mlp.up_proj.weight", (i, h), "w"),
            (p + "mlp.down_proj.weight", (h, i), "w"),
            (p + "input_layernorm.weight", (h,), "norm"),
            (p + "post_attention_layernorm.weight", (h,), "norm"),
        ]
    specs += [("model.norm.weight", (h,), "norm"), ("lm_head.weight", (v, h), "w")]
    return specs


def n_params(cfg: dict) -> int:
    import math

    return sum(math.prod(s) for _, s, _ in tensor_specs(cfg))


def group_shards(specs, limit: int) -> list[list]:
    """Greedy in order, as transformers' save_pretrained shards."""
    import math

    groups, size = [[]], 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * 2
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    return groups


def llama_config(cfg: dict) -> dict:
    from transformers import LlamaConfig

    c = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                    num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                    num_key_value_heads=cfg["kv_heads"], max_position_embeddings=2048, tie_word_embeddings=False,
                    dtype="bfloat16")
    c.architectures = ["LlamaForCausalLM"]
    return c.to_dict()


def model_dirs(root: Path) -> list[Path]:
    return [root / f"m{k}" for k in range(N_MODELS)]


def cached_ok(root: Path, manifest: dict) -> bool:
    try:
        if json.loads((root / "manifest.json").read_text()) != manifest:
            return False
        for d in model_dirs(root):
            index = json.loads((d / "model.safetensors.index.json").read_text())
            for f in set(index["weight_map"].values()):
                if not (d / f).is_file():
                    return False
        return True
    except (OSError, ValueError, KeyError):
        return False


def build_models(root: Path, cfg: dict, shard_bytes: int, seed: int) -> None:
    """Three checkpoints: one random base plus a different perturbation each, written shard by shard
    with safetensors (all three from the same base tensor, so each base tensor is drawn once)."""
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if root.exists():
        shutil.rmtree(root)
    dirs = model_dirs(root)
    tmp = [d.with_name(d.name + ".partial") for d in dirs]
    for d in tmp:
        d.mkdir(parents=True)
    config = llama_config(cfg)
    groups = group_shards(tensor_specs(cfg), shard_bytes)
    n = len(groups)
    weight_map, total = {}, 0
    gens = [torch.Generator().manual_seed(seed * 1000 + k) for k in range(N_MODELS + 1)]
    for s, group in enumerate(groups):
        fname = f"model-{s + 1:05d}-of-{n:05d}.safetensors"
        shards = [{} for _ in range(N_MODELS)]
        for name, shape, kind in group:
            base = torch.randn(shape, generator=gens[0])
            if kind == "norm":
                base.mul_(0.1).add_(1.0)
            else:
                base.mul_(INIT_STD)
            for k in range(N_MODELS):
                noise = torch.randn(shape, generator=gens[k + 1])
                shards[k][name] = noise.mul_(PERTURB * INIT_STD).add_(base).to(torch.bfloat16)
            weight_map[name] = fname
            total += base.numel() * 2
            del base
        for k in range(N_MODELS):
            save_file(shards[k], str(tmp[k] / fname), metadata={"format": "pt"})
        del shards
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    for t, d in zip(tmp, dirs):
        (t / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (t / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        os.rename(t, d)


def check_loads_in_transformers(folder: Path) -> dict:
    """Load a checkpoint with transformers in a subprocess: no missing or unexpected keys, bf16 weights."""
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "m, info = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, output_loading_info=True)\n"
        "bad = {k: sorted(v)[:5] for k, v in info.items() if v and k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')}\n"
        "dt = sorted({str(p.dtype) for p in m.parameters()})\n"
        "out = m(torch.tensor([[1, 2, 3]])).logits\n"
        "print(json.dumps({'ok': not bad and dt == ['torch.bfloat16'] and bool(torch.isfinite(out).all()),\n"
        "                  'problems': bad, 'dtypes': dt, 'params': sum(p.numel() for p in m.parameters())}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, env=ENV)
    if proc.returncode != 0:
        return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Measuring a subprocess
# --------------------------------------------------------------------------------------------

# The child is started by a small runner process, which times it and takes its rusage with os.wait4.
# Not by this process directly: Linux carries the RSS high-water mark of the forking process's memory
# across exec (and Python's subprocess forks with vfork, which shares it), so a child spawned from
# this process (which has torch loaded and has held whole shards) would report at least this
# process's own peak. The runner is a bare interpreter of ~20 MB: that is the floor of what any
# child can report. The runner also polls the child's process tree with psutil, when installed.
RUNNER = r"""
import json, os, subprocess, sys, threading, time
result_path, log_path, threads = sys.argv[1], sys.argv[2], sys.argv[3]
cmd = sys.argv[4:]
env = dict(os.environ)
if threads:
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
try:
    import psutil
except ImportError:
    psutil = None
samples = {"tree_peak": 0, "max_procs": 0}
stop = threading.Event()

def poll(pid):
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    while not stop.is_set():
        try:
            procs = [root] + root.children(recursive=True)
        except psutil.Error:
            return
        rss = 0
        for p in procs:
            try:
                rss += p.memory_info().rss
            except psutil.Error:
                pass
        samples["tree_peak"] = max(samples["tree_peak"], rss)
        samples["max_procs"] = max(samples["max_procs"], len(procs))
        stop.wait(0.02)

load0 = os.getloadavg()[0]
with open(log_path, "wb") as log:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    poller = None
    if psutil is not None:
        poller = threading.Thread(target=poll, args=(proc.pid,), daemon=True)
        poller.start()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    if poller is not None:
        poller.join()
res = {"wall_s": wall, "peak_rss_mb": ru.ru_maxrss * 1024 / 1e6,  # Linux: ru_maxrss is in KiB
       "user_s": ru.ru_utime, "sys_s": ru.ru_stime, "rc": os.waitstatus_to_exitcode(status),
       "loadavg_1m_before": load0, "loadavg_1m_after": os.getloadavg()[0]}
if psutil is not None:
    res["tree_peak_rss_mb"] = samples["tree_peak"] / 1e6
    res["max_procs"] = samples["max_procs"]
with open(result_path, "w") as f:
    json.dump(res, f)
"""


def measure(cmd: list[str], log_path: Path, threads: int | None = None) -> dict:
    """Run ``cmd`` under the runner: its wall time, its own peak RSS (wait4) and the tree's peak (psutil)."""
    result_path = log_path.with_suffix(".result.json")
    result_path.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-c", RUNNER, str(result_path), str(log_path), str(threads or ""), *cmd],
                   env=ENV, check=True, stdin=subprocess.DEVNULL)
    result = json.loads(result_path.read_text())
    if result["rc"] != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(cmd)} exited {result['rc']}; last lines of {log_path}:\n" + "\n".join(tail))
    return result


def input_files(dirs: list[Path]) -> list[Path]:
    return sorted(f for d in dirs for f in d.iterdir() if f.is_file())


def warm(files: list[Path]) -> float:
    """Read every byte once, so each timed run starts with the inputs in the page cache."""
    t0 = time.perf_counter()
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - t0


def settle(out: Path) -> None:
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():  # an I/O floor's output file
        out.unlink()
    for p in out.parent.glob(f".{out.name}.*"):  # surgery's hidden partial folders, if a run died
        shutil.rmtree(p, ignore_errors=True)
    os.sync()


def timed(cmd: list[str], outputs: list[Path], files: list[Path], log_path: Path, threads: int | None = None) -> dict:
    """One timed run on equal terms: delete ``outputs`` and flush dirty pages, warm the page cache with
    ``files``, then measure ``cmd`` (``warm_s``: how long the warming read took)."""
    for out in outputs:
        settle(out)
    warm_s = warm(files)
    r = measure(cmd, log_path, threads)
    r["warm_s"] = warm_s
    return r


IO_FLOOR = r"""
import os, sys
out, size, fsync = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
buf = bytearray(16 << 20)
view = memoryview(buf)
for path in sys.argv[4:]:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
with open(out, "wb", buffering=0) as f:
    left = size
    while left:
        left -= f.write(view[:min(left, len(buf))])
    if fsync:
        os.fsync(f.fileno())
"""


def executable(name: str) -> str:
    """A console script of this interpreter's environment (else from PATH)."""
    bindir = Path(sys.executable).parent
    return str(bindir / name if (bindir / name).exists() else shutil.which(name))


def mergekit_command(config: Path, out: Path, shard: str, mergekit_args: list[str]) -> list[str]:
    # --out-shard-size is called a parameter count in mergekit's help, but its writer compares
    # it with tensor bytes (numel * element_size): the same byte limit as surgery's.
    return [executable("mergekit-yaml"), str(config), str(out), "--out-shard-size", str(parse_size(shard)),
            "--no-copy-tokenizer", "--lazy-unpickle", "--quiet", *mergekit_args]


def tool_commands(tool: str, inputs: list[Path], out: Path, shard: str, work: Path, mergekit_args: list[str]):
    if tool in ("surgery", "surgery-omp1"):
        return [executable("surgery"), "soup", *map(str, inputs), "-o", str(out), "--max-shard-size", shard,
                "--device", "cpu", "-q"]
    if tool == "mergekit":
        config = work / "mergekit-linear.yml"
        lines = ["merge_method: linear", "dtype: bfloat16", "models:"]
        for p in inputs:
            lines += [f"  - model: {p}", "    parameters:", "      weight: 1.0"]
        config.write_text("\n".join(lines) + "\n")
        return mergekit_command(config, out, shard, mergekit_args)
    raise ValueError(tool)


def floor_command(inputs: list[Path], out: Path, out_bytes: int, fsync: bool) -> list[str]:
    return [sys.executable, "-c", IO_FLOOR, str(out), str(out_bytes), "1" if fsync else "0",
            *map(str, input_files(inputs))]


# --------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------

class Folder:
    """Tensors of a safetensors checkpoint folder, by name."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.exists():
            wmap = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(folder.glob("*.safetensors"))
            wmap = {}
            for f in files:
                with safe_open(str(f), "pt") as h:
                    wmap.update({k: f.name for k in h.keys()})
        self.folder = folder
        self.weight_map = wmap
        self.handles = {f: safe_open(str(folder / f), "pt") for f in sorted(set(wmap.values()))}

    def names(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str):
        return self.handles[self.weight_map[name]].get_tensor(name)

    def shard_sizes(self) -> list[int]:
        return [(self.folder / f).stat().st_size for f in self.handles]


def ulp_ordinal(t):
    """bf16 bit patterns as integers ordered like the values (so a difference counts ulps; +0 == -0)."""
    import torch

    bits = t.contiguous().view(torch.int16).to(torch.int32)
    mag = bits & 0x7FFF
    return torch.where(bits < 0, -mag, mag)


def input_ulp(xs):
    """The bf16 ulp of the largest-magnitude input at each element: the scale an error is judged on
    where a mean cancels to (nearly) zero, where ulps of the result itself mean nothing."""
    import torch

    scale = xs[0].float().abs()
    for x in xs[1:]:
        torch.maximum(scale, x.float().abs(), out=scale)
    _, exponent = torch.frexp(scale)  # scale = m * 2**e, 0.5 <= m < 1: ulp is 2**(e - 8) in bf16
    return torch.ldexp(torch.ones_like(scale), exponent - 8)


class UlpStats:
    """Differences between two bf16 tensors, element by element, in units in the last place.

    Only the elements that differ are examined closely (a soup's output mostly matches), so a check
    costs little more than one comparison per pair.
    """

    def __init__(self):
        self.max = 0
        self.total = 0
        self.max_abs = 0.0
        self.max_input_ulps = 0.0
        self.worst = None
        self.hist = [0] * 9  # 0, 1, ..., 7, >= 8 ulps

    def add(self, name: str, a, b, xs) -> None:
        import torch

        a, b = a.reshape(-1), b.reshape(-1)
        self.total += a.numel()
        idx = (a != b).nonzero().reshape(-1)  # +0 == -0, as in ulp_ordinal; a NaN differs from everything
        self.hist[0] += a.numel() - idx.numel()
        if not idx.numel():
            return
        a, b = a[idx], b[idx]
        d = (ulp_ordinal(a) - ulp_ordinal(b)).abs_()
        d = torch.where(torch.isnan(a.float()) | torch.isnan(b.float()), 1 << 16, d)
        m = int(d.max())
        if m > self.max:
            self.max, self.worst = m, name
        for k, c in enumerate(torch.bincount(d.clamp(max=8), minlength=9).tolist()):
            self.hist[k] += c
        err = (a.float() - b.float()).abs_()
        self.max_abs = max(self.max_abs, float(err.max()))
        scale = input_ulp([x.reshape(-1)[idx] for x in xs])
        self.max_input_ulps = max(self.max_input_ulps, float(err.div_(scale).max()))

    def result(self) -> dict:
        n = max(self.total, 1)
        return {"max_ulp": self.max, "exact_fraction": self.hist[0] / n,
                "within_1ulp_fraction": (self.hist[0] + self.hist[1]) / n, "max_abs_diff": self.max_abs,
                "max_err_in_input_ulps": self.max_input_ulps, "elements": self.total, "worst_tensor": self.worst,
                "ulp_histogram": {(">=8" if k == 8 else str(k)): c for k, c in enumerate(self.hist) if c}}


def shard_report(folder: Folder, limit: int) -> dict:
    """Data bytes of each shard (from its header); a shard over the limit is fine only if it holds one tensor."""
    over = []
    biggest = 0
    for fname in folder.handles:
        with open(folder.folder / fname, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        data = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
        biggest = max(biggest, data)
        if data > limit and len(header) > 1:
            over.append(fname)
    return {"shards": len(folder.handles), "max_shard_data_bytes": biggest, "over_limit": over}


def check_correctness(inputs: list[Path], surgery_out: Path, mergekit_out: Path | None, shard_limit: int) -> dict:
    """surgery's output against two references computed here from the inputs, and against mergekit's.

    ref f32: the weighted mean in float32, sum(w_i * x_i) / sum(w_i) with w_i = 1, cast once to bf16.
    ref exact: the same in float64; the sum of three bf16 values is exact in float64, so this is the
    correctly rounded mean (ties to even).
    """
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    t0 = time.perf_counter()
    ins = [Folder(p) for p in inputs]
    s = Folder(surgery_out)
    m = Folder(mergekit_out) if mergekit_out is not None else None
    names = ins[0].names()
    res = {"surgery_names_match_inputs": s.names() == names, "surgery_shards": shard_report(s, shard_limit),
           "shard_limit_bytes": shard_limit}
    if m is not None:
        res.update(mergekit_names_match_inputs=m.names() == names, mergekit_shards=shard_report(m, shard_limit))
    raw = [1.0] * len(ins)
    stats = {k: UlpStats() for k in ("surgery_vs_ref_f32", "surgery_vs_ref_exact", "surgery_vs_mergekit",
                                      "mergekit_vs_ref_exact")}
    bad = []
    for name in sorted(names & s.names()):
        xs = [f.get(name) for f in ins]
        out = s.get(name)
        if out.dtype != torch.bfloat16 or out.shape != xs[0].shape:
            bad.append(name)
            continue
        acc32 = xs[0].to(torch.float32)
        acc64 = xs[0].to(torch.float64)
        for x in xs[1:]:  # raw weights are all 1
            acc32.add_(x)
            acc64.add_(x)
        ref32 = acc32.div_(sum(raw)).to(torch.bfloat16)
        exact = acc64.div_(sum(raw)).to(torch.bfloat16)
        del acc32, acc64
        stats["surgery_vs_ref_f32"].add(name, out, ref32, xs)
        stats["surgery_vs_ref_exact"].add(name, out, exact, xs)
        if m is not None and name in m.weight_map:
            mo = m.get(name)
            if mo.dtype != torch.bfloat16 or mo.shape != out.shape:
                bad.append("mergekit:" + name)
            else:
                stats["surgery_vs_mergekit"].add(name, out, mo, xs)
                stats["mergekit_vs_ref_exact"].add(name, mo, exact, xs)
        del xs, out, ref32, exact
    for k, v in stats.items():
        if v.total:
            res[k] = v.result()
    res["bad_dtype_or_shape"] = bad
    res["check_s"] = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------

def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    for pkg in ("surgery", "torch", "safetensors", "transformers", "mergekit", "psutil"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "surgery", "cli"],
                               capture_output=True, text=True)
        out["surgery_git"] = rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        pass
    try:
        out["mem_total_gb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
        out["loadavg_at_start"] = os.getloadavg()
    except (OSError, ValueError, AttributeError):
        pass
    return out


def baselines(work: Path, with_mergekit: bool, threads: int | None) -> dict:
    """Startup costs each tool pays before its first weight: importing torch, importing mergekit."""
    rows = {"python -c 'import torch'": [sys.executable, "-c", "import torch"]}
    if with_mergekit:
        rows["python -c 'import mergekit.merge'"] = [sys.executable, "-c", "import mergekit.merge"]
    out = {}
    for label, cmd in rows.items():
        out[label] = measure(cmd, work / "logs" / "baseline.log", threads)
    return out


def prepare_models(args, cfg: dict, mult: int, models_root: Path) -> tuple[dict, Path, str, dict]:
    """Build (or, with ``args.keep``, reuse) the checkpoints of one size.

    Returns the scaled config, their folder, its cache key, and the size's record (parameters, shard
    size, build time, the transformers load check of a freshly built input)."""
    cfg = dict(cfg, layers=cfg["layers"] * mult)
    shard = args.shard_size or cfg["shard"]
    shard_bytes = parse_size(shard)
    manifest = {"builder": BUILDER_VERSION, "cfg": cfg, "shard_bytes": shard_bytes, "seed": args.seed,
                "n_models": N_MODELS, "perturb": PERTURB}
    key = f"L{cfg['layers']}-h{cfg['hidden']}-i{cfg['intermediate']}-v{cfg['vocab']}-s{shard_bytes}"
    root = models_root / key
    size = {"layer_multiplier": mult, "config": cfg, "params": n_params(cfg), "shard_size": shard,
            "shard_bytes": shard_bytes}
    if args.keep and cached_ok(root, manifest):
        log(f"reusing checkpoints in {root}")
        size["built"] = False
    else:
        log(f"building {N_MODELS} checkpoints of {size['params'] / 1e6:.1f}M parameters ({cfg['layers']} layers) in {root}")
        t0 = time.perf_counter()
        build_models(root, cfg, shard_bytes, args.seed)
        (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        size["build_s"] = time.perf_counter() - t0
        size["built"] = True
        log(f"built in {size['build_s']:.1f}s")
        if not args.no_load_check:
            size["input_loads_in_transformers"] = check_loads_in_transformers(model_dirs(root)[0])
            log(f"transformers load of an input: {size['input_loads_in_transformers']}")
    return cfg, root, key, size


def run_size(args, cfg: dict, mult: int, models_root: Path, work: Path, tools: list[str]) -> dict:
    cfg, root, key, size = prepare_models(args, cfg, mult, models_root)
    shard = args.shard_size or cfg["shard"]
    shard_bytes = parse_size(shard)
    inputs = model_dirs(root)
    files = input_files(inputs)
    size["input_bytes_each"] = sum(f.stat().st_size for f in files) // N_MODELS
    size["input_shards_each"] = sum(1 for f in files if f.suffix == ".safetensors") // N_MODELS
    out_bytes = size["input_bytes_each"]
    outs = work / "out" / key
    outs.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    samples: dict[str, list[dict]] = {t: [] for t in tools}
    for rep in range(args.repeat):
        for tool in tools:
            out = outs / tool
            if tool == "io-floor":
                cmd = floor_command(inputs, out.with_suffix(".bin"), out_bytes, fsync=True)
            elif tool == "io-floor-nofsync":
                cmd = floor_command(inputs, out.with_suffix(".bin"), out_bytes, fsync=False)
            else:
                cmd = tool_commands(tool, inputs, out, shard, work, args.mergekit_arg)
            r = timed(cmd, [out, out.with_suffix(".bin")], files, logs / f"{key}-{tool}-{rep}.log",
                      1 if tool == "surgery-omp1" else args.threads)
            samples[tool].append(r)
            log(f"x{mult} rep {rep + 1}/{args.repeat} {tool:17s} {r['wall_s']:7.2f}s  {r['peak_rss_mb']:8.1f} MB")
        for p in outs.glob("*.bin"):
            p.unlink()
    size["runs"] = samples
    size["summary"] = {t: summarize(v) for t, v in samples.items()}
    if not args.no_check and (mult == mults_checked(args) or args.check_every_size):
        log("checking correctness")
        mk = outs / "mergekit" if "mergekit" in tools else None
        size["correctness"] = check_correctness(inputs, outs / "surgery", mk, shard_bytes)
        if not args.no_load_check:
            size["correctness"]["surgery_output_loads_in_transformers"] = check_loads_in_transformers(outs / "surgery")
        log(f"correctness checked in {size['correctness']['check_s']:.1f}s")
    if not args.keep:
        shutil.rmtree(outs, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
    return size


def mults_checked(args) -> int:
    return int(args.layers.split(",")[0])


def summarize(runs: list[dict]) -> dict:
    walls = [r["wall_s"] for r in runs]
    s = {"wall_s": statistics.median(walls), "wall_min_s": min(walls), "wall_max_s": max(walls),
         "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
         "cpu_s": statistics.median(r["user_s"] + r["sys_s"] for r in runs), "n": len(runs)}
    if "tree_peak_rss_mb" in runs[0]:
        s["tree_peak_rss_mb"] = max(r["tree_peak_rss_mb"] for r in runs)
        s["max_procs"] = max(r["max_procs"] for r in runs)
    return s


def ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}" if b else "-"


CORRECTNESS_HEADER = ["", "| size | comparison | max ulp (bf16) | exact fraction | within 1 ulp | max abs diff | "
                      "max err (input ulps) | worst tensor |",
                      "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]


def baseline_lines(result: dict) -> list[str]:
    """The startup-baseline table (import torch, import mergekit), shared by the benchmarks."""
    base = result.get("baselines") or {}
    if not base:
        return []
    lines = ["", "| startup baseline | wall s | peak RSS MB |", "| --- | ---: | ---: |"]
    for label, r in base.items():
        lines.append(f"| `{label}` | {r['wall_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    return lines


def tables(result: dict) -> str:
    lines = ["| size | tool | wall s | peak RSS MB | CPU s | wall / surgery | wall / I/O floor |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for size in result["sizes"]:
        sm = size["summary"]
        label = f"{size['params'] / 1e6:.0f}M ({size['config']['layers']}L)"
        ref_s = sm.get("surgery", {}).get("wall_s")
        ref_f = sm.get("io-floor", {}).get("wall_s")
        for tool, s in sm.items():
            spread = f" ({s['wall_min_s']:.2f}-{s['wall_max_s']:.2f})" if s["n"] > 1 else ""
            lines.append(f"| {label} | {tool} | {s['wall_s']:.2f}{spread} | {s['peak_rss_mb']:.0f} | {s['cpu_s']:.2f} | "
                         f"{ratio(s['wall_s'], ref_s)} | {ratio(s['wall_s'], ref_f)} |")
    lines += baseline_lines(result)
    checks = [(s, s.get("correctness")) for s in result["sizes"] if s.get("correctness")]
    if checks:
        lines += CORRECTNESS_HEADER
        for size, c in checks:
            label = f"{size['params'] / 1e6:.0f}M ({size['config']['layers']}L)"
            for key, what in (("surgery_vs_ref_f32", "surgery vs float32 reference"),
                              ("surgery_vs_ref_exact", "surgery vs exact mean"),
                              ("surgery_vs_mergekit", "surgery vs mergekit"),
                              ("mergekit_vs_ref_exact", "mergekit vs exact mean")):
                if key in c:
                    u = c[key]
                    lines.append(f"| {label} | {what} | {u['max_ulp']} | {u['exact_fraction']:.6f} | "
                                 f"{u['within_1ulp_fraction']:.6f} | {u['max_abs_diff']:.3g} | "
                                 f"{u['max_err_in_input_ulps']:.3g} | "
                                 f"{u['worst_tensor'] if u['max_ulp'] else '-'} |")
    t = result.get("targets")
    if t:
        lines += [""] + [f"- {k}: {v}" for k, v in t.items()]
    return "\n".join(lines)


def targets(result: dict) -> dict:
    out = {}
    sizes = result["sizes"]
    for size in sizes:
        sm = size["summary"]
        tag = f"x{size['layer_multiplier']}"
        if "surgery" in sm and "mergekit" in sm:
            sp = sm["mergekit"]["wall_s"] / sm["surgery"]["wall_s"]
            out[f"{tag} speed-up over mergekit (target >= 3)"] = f"{sp:.2f}x {'PASS' if sp >= 3 else 'FAIL'}"
        if "surgery" in sm:
            rss = sm["surgery"]["peak_rss_mb"]
            out[f"{tag} surgery peak RSS (target < 1000 MB)"] = f"{rss:.0f} MB {'PASS' if rss < 1000 else 'FAIL'}"
    if len(sizes) >= 2 and all("surgery" in s["summary"] for s in sizes):
        a, b = sizes[0]["summary"]["surgery"]["peak_rss_mb"], sizes[-1]["summary"]["surgery"]["peak_rss_mb"]
        growth = b / a
        flat = growth <= 1.10 or b - a <= 50
        out[f"surgery peak RSS x{sizes[-1]['layer_multiplier']} / x{sizes[0]['layer_multiplier']} "
            f"(target flat: <= 1.10 or <= +50 MB)"] = f"{growth:.3f} ({b - a:+.0f} MB) {'PASS' if flat else 'FAIL'}"
    for size in sizes:
        c = size.get("correctness")
        if c:
            u = c["surgery_vs_ref_exact"]
            ok = (c["surgery_names_match_inputs"] and not c["bad_dtype_or_shape"] and u["max_err_in_input_ulps"] <= 1.0
                  and not c["surgery_shards"]["over_limit"]
                  and c.get("surgery_output_loads_in_transformers", {"ok": True})["ok"])
            out[f"x{size['layer_multiplier']} surgery output valid (names, bf16, shard limit, error <= 1 input ulp, "
                "loads in transformers)"] = \
                "PASS" if ok else "FAIL"
            out[f"x{size['layer_multiplier']} surgery output bit-exact (= correctly rounded mean)"] = \
                f"{u['exact_fraction']:.6f} of elements {'PASS' if u['max_ulp'] == 0 else 'FAIL'}"
    return out


def add_shared_args(ap) -> None:
    """Options every benchmark here takes (bench_task_vectors imports these)."""
    ap.add_argument("--no-load-check", action="store_true", help="skip loading input and output with transformers")
    ap.add_argument("--no-baselines", action="store_true", help="skip the import-time baselines")
    ap.add_argument("--mergekit-arg", action="append", default=[],
                    help="extra argument for mergekit-yaml (repeatable), e.g. --mergekit-arg=--async-write")
    ap.add_argument("--threads", type=int, default=None,
                    help="set OMP_NUM_THREADS and MKL_NUM_THREADS for every timed tool (default: leave unset)")


def add_output_args(ap, stem: str) -> None:
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=HERE / "_work", help="work folder (default benchmarks/_work)")
    ap.add_argument("--name", default=None, help=f"results file name (default {stem}-<scale>)")
    ap.add_argument("--results", type=Path, default=HERE / "results", help="results folder (default benchmarks/results)")


def finish_args(args) -> tuple[list[int], bool]:
    """Fill defaults that depend on the scale; return the layer multipliers and whether mergekit runs."""
    if args.repeat is None:
        args.repeat = 3 if args.scale == "full" else 1
    mults = [int(x) for x in args.layers.split(",") if x.strip()]
    have_mergekit = importlib.util.find_spec("mergekit") is not None
    if not args.skip_mergekit and not have_mergekit:
        log("mergekit is not importable: skipping it (pip install -e '.[bench]' to include it)")
    return mults, have_mergekit and not args.skip_mergekit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="full",
                    help="full: ~309M parameters at 1x (default); small: ~20M, a quick end-to-end check")
    ap.add_argument("--layers", default="1,2",
                    help="layer-count multipliers to run, comma-separated (default 1,2: the model and twice its depth)")
    ap.add_argument("--repeat", type=int, default=None,
                    help="timed runs of each tool per size; the median wall is reported (default: 3 full, 1 small)")
    ap.add_argument("--shard-size", default=None, help="input and output shard size (default: 200MB full, 10MB small)")
    ap.add_argument("--skip-mergekit", action="store_true", help="do not run mergekit (automatic when not installed)")
    ap.add_argument("--keep", action="store_true",
                    help="reuse checkpoints cached under the work folder, and leave checkpoints and outputs there")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    ap.add_argument("--check-every-size", action="store_true",
                    help="check correctness at every size (default: only the first, the 1x model)")
    add_shared_args(ap)
    ap.add_argument("--surgery-omp1", action="store_true",
                    help="also time surgery with OMP_NUM_THREADS=1 (row surgery-omp1), to see what OpenMP threads cost it")
    add_output_args(ap, "soup")
    args = ap.parse_args(argv)
    mults, with_mergekit = finish_args(args)
    tools = ["io-floor", "io-floor-nofsync", "surgery"] + (["surgery-omp1"] if args.surgery_omp1 else []) + \
        (["mergekit"] if with_mergekit else [])
    if importlib.util.find_spec("psutil") is None:
        log("psutil is not installed: only wait4's ru_maxrss is reported")

    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "soup", "scale": args.scale, "date": _dt.datetime.now().isoformat(timespec="seconds"),
              "argv": sys.argv[1:], "n_models": N_MODELS, "repeat": args.repeat, "tools": tools,
              "env": versions(), "sizes": []}
    if not args.no_baselines:
        result["baselines"] = baselines(work, with_mergekit, args.threads)
    for mult in mults:
        result["sizes"].append(run_size(args, SCALES[args.scale], mult, work / "models", work, tools))
    result["targets"] = targets(result)

    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{args.name or 'soup-' + args.scale}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(tables(result))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
