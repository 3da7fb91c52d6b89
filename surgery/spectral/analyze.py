"""``analyze``: intruder dimensions and spectral change of fine-tunes against their base, streamed.

Matrices are read in batches of one shape (a few tens of MB, see :mod:`.matrices`) with the engine's
read-ahead, decomposed together on the compute device, and dropped: memory holds a few matrices and
their decompositions, never the model. The base's SVDs come from the cache when it has them.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Sequence

from ..engine.plan import Ref
from ..engine.stream import stream_inputs
from ..errors import PlanError
from ..io.checkpoint import Checkpoint, open_checkpoint
from ..layers import block_index
from . import svd
from .cache import MIN_VH_ROWS, STORED_DTYPE, SVDCache, default_cache_dir, entry_key, vh_rows_needed
from .intruders import effective_rank, intruder_counts, similarities, subspace_energy
from .matrices import DEFAULT_BATCH_BYTES, batches, check_checkpoint, select
from .result import FineTuneResult, MatrixResult, SpectralResult, eps_key
from .sources import CheckpointFineTune, as_finetune, label_of

DEFAULT_EPSILONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
READ_AHEAD_BYTES = 64 << 20

# corrections(fine-tune index, matrix name, U of the intruders (m, j), S (j), Vh (j, n)): see .mitigate
CorrectionSink = Callable[[int, str, object, object, object], None]


def analyze(base, fts: Sequence, include=None, k: int = 10, epsilons: Sequence[float] = DEFAULT_EPSILONS,
            cache_dir=None, device: str = "auto", *, epsilon: float = 0.5, ft_svd: str = "auto",
            tol: float = svd.DEFAULT_TOL, allow_pickle: bool = False, progress=None,
            corrections: CorrectionSink | None = None, batch_bytes: int = DEFAULT_BATCH_BYTES) -> SpectralResult:
    """Compare each fine-tune in ``fts`` with ``base``, matrix by matrix.

    ``fts``: checkpoint locations or :class:`Checkpoint` objects (streamed), TaskVectors, or any object
    with ``finetuned_matrix(name, base)`` (see :mod:`.sources`). ``include``: regex(es) choosing the
    matrices (default: the 2-D float tensors inside numbered blocks, embeddings excluded). ``k``: the
    top fine-tuned singular vectors tested; ``epsilon`` the headline threshold, ``epsilons`` the sweep
    (the headline one is added if missing). ``cache_dir``: where base SVDs are kept (None: the user
    cache folder, see :func:`.cache.default_cache_dir`; False: nowhere). ``ft_svd``: ``auto``, ``full``
    or ``randomized`` for the fine-tune's top-k (see :func:`.svd.topk_svd`; ``tol`` its accuracy).
    """
    import torch

    from ..engine.executor import Progress
    from ..engine.torch_compute import reader as make_reader, resolve_device
    from ..recipes.run import content_hash

    if isinstance(fts, (str, Checkpoint)) or not hasattr(fts, "__iter__"):
        raise PlanError("fts must be a list of fine-tunes, not a single one")
    if not isinstance(k, int) or k < 1:
        raise PlanError(f"k must be a positive integer, got {k!r}")
    if ft_svd not in svd.METHODS:
        raise PlanError(f"unknown fine-tune SVD method {ft_svd!r}; use {', '.join(svd.METHODS)}")
    sweep = sorted({float(e) for e in epsilons} | {float(epsilon)})
    if any(not 0.0 < e <= 1.0 for e in sweep):
        raise PlanError(f"epsilons must lie in (0, 1] (cosine similarities), got {sweep}")
    start = time.perf_counter()
    base_ckpt = base if isinstance(base, Checkpoint) else open_checkpoint(base, allow_pickle=allow_pickle)
    sources = [as_finetune(f, base_ckpt, allow_pickle) for f in fts]
    if not sources:
        raise PlanError("no fine-tunes given")
    names = select(base_ckpt, include)
    streamed = {}  # source index -> input index in the stream
    ckpts = [base_ckpt]
    for i, s in enumerate(sources):
        if isinstance(s, CheckpointFineTune):
            check_checkpoint(base_ckpt, s.checkpoint, names)
            streamed[i] = len(ckpts)
            ckpts.append(s.checkpoint)
    dev = resolve_device(device)
    cache = SVDCache(None if cache_dir is False else (default_cache_dir() if cache_dir is None else cache_dir))
    groups = batches(base_ckpt, names, batch_bytes)
    jobs = [(g, [Ref(j, n) for j in range(len(ckpts)) for n in group]) for g, group in enumerate(groups)]
    digests: dict = {}
    read = make_reader(dev)
    results = [[] for _ in sources]
    total_bytes = sum(ckpts[r.input].resolve(r.name).nbytes for _, needs in jobs for r in needs)
    done = bytes_done = 0
    with torch.no_grad(), contextlib.closing(stream_inputs(ckpts, jobs, read, READ_AHEAD_BYTES,
                                                           digests=digests, hash_inputs=[0])) as stream:
        for g, loaded, nbytes in stream:
            group = groups[g]
            w0 = torch.stack([loaded[Ref(0, n)].to(dev, torch.float32) for n in group])
            u0, s0, vh0, from_cache = _base_svds(base_ckpt, group, w0, digests, cache, k)
            for i, source in enumerate(sources):
                if i in streamed:
                    wt = torch.stack([loaded[Ref(streamed[i], n)].to(dev, torch.float32) for n in group])
                else:
                    wt = torch.stack([_matrix_of(source, n, w0[b]) for b, n in enumerate(group)])
                results[i].extend(_compare(group, w0, wt, u0, s0, vh0, from_cache, k, sweep, epsilon, ft_svd, tol,
                                           i, corrections))
                del wt
            read.release([ckpts[r.input].resolve(r.name) for r in loaded])
            del loaded, w0, u0, s0, vh0
            done += len(group)
            bytes_done += nbytes
            if progress is not None:
                progress(Progress(done, len(names), bytes_done, total_bytes, group[-1]))
    order = {n: i for i, n in enumerate(names)}  # report in file order, not batch order
    fine_tunes = [FineTuneResult(label_of(s), sorted(r, key=lambda m: order[m.name])) for s, r in zip(sources, results)]
    settings = {
        "device": str(dev), "svd_dtype": "float32",
        "base_svd": "thin SVD, torch.linalg.svd(full_matrices=False); similarity over all its left vectors",
        "ft_svd": ft_svd, "ft_svd_tolerance": tol,
        "ft_svd_note": "randomized: subspace iteration warm-started from the base's top right vectors, run until "
                       "residual/gap <= tolerance for every top-k vector, else the full SVD (per matrix, see ft_svd)",
        "update_spectrum": "sqrt of eigvalsh of the float64 Gram matrix of W_ft - W_base (smaller side)",
        "effective_rank": "Roy & Vetterli (2007): exp(Shannon entropy, nats, of s_i / sum(s)) of the update",
        "energy": "share of ||W_ft - W_base||_F^2 in the base's top-k left / right / two-sided singular subspace",
        "layout": "matrices as stored (out, in) for nn.Linear; GPT-2 Conv1D stores (in, out)",
        "include": include, "selected_matrices": len(names),
    }
    cache_info = {"folder": str(cache.folder) if cache.folder else None, "stored_dtype": STORED_DTYPE,
                  "hits": cache.hits, "misses": cache.misses}
    return SpectralResult(base_ckpt.source, content_hash(digests, 0), k, float(epsilon), sweep, fine_tunes, settings,
                          cache_info, time.perf_counter() - start)


def _matrix_of(source, name: str, base_matrix):
    import torch

    m = source.finetuned_matrix(name, base_matrix)
    if not isinstance(m, torch.Tensor) or tuple(m.shape) != tuple(base_matrix.shape):
        got = tuple(m.shape) if hasattr(m, "shape") else type(m).__name__
        raise PlanError(f"fine-tune {label_of(source)} gave {got} for matrix {name!r}, expected a tensor of shape "
                        f"{tuple(base_matrix.shape)}")
    return m.to(base_matrix.device, torch.float32)


def _base_svds(base: Checkpoint, group: list[str], w0, digests: dict, cache: SVDCache, k: int):
    """U (b, m, r), S (b, r), Vh top rows (b, rows, n) of each base matrix: from the cache, or computed
    (batched) and stored."""
    import torch

    rank = min(w0.shape[1:])
    rows = vh_rows_needed(k, rank)
    keep_rows = min(rank, max(MIN_VH_ROWS, rows))
    keys, found = [], []
    for n in group:
        info = base.resolve(n)
        keys.append(entry_key(n, info.shape, info.dtype, digests[(0, info.name)]))
        found.append(cache.get(keys[-1], rows, w0.device))
    missing = [b for b, f in enumerate(found) if f is None]
    if missing:
        u, s, vh = svd.full_svd(w0[missing])
        for j, b in enumerate(missing):
            found[b] = (u[j], s[j], vh[j, :keep_rows])
            info = base.resolve(group[b])
            cache.put(keys[b], u[j], s[j], vh[j, :keep_rows],
                      {"name": group[b], "shape": list(info.shape), "dtype": info.dtype, "base": base.source})
    u0 = torch.stack([f[0] for f in found])
    s0 = torch.stack([f[1] for f in found])
    vh0 = torch.stack([f[2][:rows] for f in found])
    return u0, s0, vh0, [b not in missing for b in range(len(group))]


def _compare(group, w0, wt, u0, s0, vh0, from_cache, k, sweep, epsilon, ft_svd, tol, source_index, corrections):
    kk = min(k, min(w0.shape[1:]))
    top = svd.topk_svd(wt, kk, ft_svd, warm=vh0, tol=tol, seed=group[0])
    best, where, heat = similarities(u0, top.u)
    counts = intruder_counts(best, sweep)
    delta = wt.double() - w0.double()
    spectrum = svd.update_singular_values(delta)
    ranks = effective_rank(spectrum)
    energy = subspace_energy(delta, u0[:, :, :kk], vh0[:, :kk])
    out = []
    for b, name in enumerate(group):
        sims = best[b].tolist()
        idx = [j for j, v in enumerate(sims) if v < epsilon]
        if corrections is not None and idx:
            corrections(source_index, name, top.u[b][:, idx], top.s[b][idx], top.vh[b][idx])
        blk = block_index(name)
        out.append(MatrixResult(
            name=name, shape=tuple(w0.shape[1:]), stack=blk[0] if blk else None, layer=blk[1] if blk else None,
            similarity=sims, best_match=where[b].tolist(),
            intruders={eps_key(e): counts[e][b] for e in sweep}, intruder_indices=idx,
            base_singular_values=s0[b, :kk].tolist(), ft_singular_values=top.s[b].tolist(),
            update_singular_values=spectrum[b, :kk].tolist(), update_effective_rank=ranks[b],
            update_frobenius_sq=energy[b]["frobenius_sq"],
            energy_in_base_topk={key: energy[b][key] for key in ("left", "right", "both")},
            ft_svd={"method": top.method[b], "iterations": top.iterations[b], "error_bound": top.error_bound[b]},
            base_svd="cache" if from_cache[b] else "computed", heat=heat[b].tolist()))
    return out
