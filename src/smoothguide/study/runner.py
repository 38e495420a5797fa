"""Running a study: sample the missing units of this rank, then reduce the metrics.

:func:`run_study` is the same code in-process and on every rank of
``accelerate launch`` / ``torchrun``:

1. validate the definition and the metric weights (feature extractor, CLIP score,
   LPIPS) before any sampling;
2. check the output folder's definition hash; rank 0 creates ``study.json``, the
   reference features and removes temporary files of killed writers; barrier;
3. phase 1: the unguided baseline units of this rank (static shard, see
   :func:`~smoothguide.study.units.shard`), skipping those already in the store;
   barrier (the guided units compare with them);
4. phase 2: the guided units of this rank; barrier;
5. each rank sums the metrics of its shard from the store; one ``all_reduce``
   (and one ``all_gather`` of the fixed-size KID reservoirs); rank 0 writes
   ``metrics.json`` and ``summary.json``.

A killed run loses at most the units in flight; the same command completes the rest.
"""

from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .definition import Setting, Study, StudyError
from .dist import Dist, init_dist
from .metrics import (
    FEATURE_METRICS,
    PAIRED_METRICS,
    SCALAR_METRICS,
    check_feature_weights,
    check_metric_weights,
    frechet_from_sums,
    kid_unbiased,
    load_extractor,
    load_metric_nets,
    per_sample_metrics,
)
from .models import resolve_model
from .store import Store, atomic_write
from .units import Unit, make_units, noise_seed, shard, unit_noise

__all__ = ["reduce_metrics", "run_study"]

#: Testing hook: SIGKILL this process while writing the unit after this many units.
KILL_AFTER_ENV = "SMOOTHGUIDE_STUDY_KILL_AFTER"
#: Testing hook: only this rank obeys :data:`KILL_AFTER_ENV` (default: every rank).
KILL_RANK_ENV = "SMOOTHGUIDE_STUDY_KILL_RANK"
REFERENCE_FILE = "reference.safetensors"
_PAD = np.iinfo(np.int64).max


def _kill_hook(rank: int) -> int | None:
    k = os.environ.get(KILL_AFTER_ENV)
    r = os.environ.get(KILL_RANK_ENV)
    if k is None or (r is not None and int(r) != rank):
        return None
    return int(k)


def _fmt_s(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    m, sec = divmod(int(s), 60)
    return f"{m}m{sec:02d}s" if m else f"{s:.1f}s"


def _feature_metrics(study: Study) -> bool:
    return any(m in FEATURE_METRICS for m in study.metrics)


def _sample_unit(
    study: Study,
    settings: Sequence[Setting],
    items: Sequence[Any],
    unit: Unit,
    model: Any,
    extractor: Any,
    store: Store,
    nets: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, Any], float]:
    import torch
    from safetensors.torch import save

    t0 = time.perf_counter()
    setting = settings[unit.setting]
    noise = unit_noise(study.seed, items, unit, model.noise_shape)
    its = [items[i] for i, _ in unit.items]
    rule = setting.build(weak=getattr(model, "weak_model", None))
    x = model.sample(rule, its, noise, study.sampler.steps).float().contiguous()
    t_sample = time.perf_counter() - t0
    feats, probs = extractor(x) if extractor is not None else (None, None)
    ref = None
    if any(m in PAIRED_METRICS for m in study.metrics):
        if unit.setting == 0:
            ref = x
        else:
            ref = store.read_tensors(unit.baseline_uid, ("samples",))["samples"]
    per = per_sample_metrics(x, ref, probs, model.class_labels(its), study.metrics)
    nets = nets or {}
    if "lpips" in nets and ref is not None:
        per["lpips"] = nets["lpips"](x, ref).tolist()
    if "clip_score" in nets:
        per["clip_score"] = nets["clip_score"](x, [str(v) for v in its]).tolist()
    seeds = [noise_seed(study.seed, items[i], k) for i, k in unit.items]
    tensors = {
        "samples": x,
        "item": torch.tensor([i for i, _ in unit.items], dtype=torch.int64),
        "seed_index": torch.tensor([k for _, k in unit.items], dtype=torch.int64),
        "noise_seed": torch.tensor(seeds, dtype=torch.int64),
    }
    if feats is not None:
        tensors["features"] = feats.float().contiguous()
    # one metadata key only: safetensors writes a multi-key metadata map in hash order,
    # which would make the bytes of identical units differ between runs
    blob = save(tensors, metadata={"unit": unit.uid})
    rows = [
        {"item": i, "seed_index": k, "noise_seed": s, **{m: v[j] for m, v in per.items()}}
        for j, ((i, k), s) in enumerate(zip(unit.items, seeds, strict=True))
    ]
    body = {
        "unit": unit.uid,
        "setting": unit.setting,
        "name": setting.name,
        "rows": rows,
        "seconds": {"sample": t_sample, "unit": time.perf_counter() - t0},
    }
    return blob, body, t_sample


def _write_reference(study: Study, store: Store, model: Any, extractor: Any) -> None:
    from safetensors.torch import save

    path = os.path.join(store.root, REFERENCE_FILE)
    if os.path.exists(path):
        return
    images = model.reference_images()
    if images is None:
        raise StudyError(
            f"metrics {', '.join(m for m in study.metrics if m in ('fd', 'kid'))}: model "
            f"{study.model!r} has no reference images (reference_images() returned None); "
            "set its reference option or remove fd / kid from metrics"
        )
    chunks = [extractor(images[i : i + 500])[0] for i in range(0, images.shape[0], 500)]
    import torch

    atomic_write(path, save({"features": torch.cat(chunks).float().contiguous()}))


def run_study(
    study: Study,
    out: str,
    *,
    dist: Dist | None = None,
    progress: bool = True,
    cpu: bool = False,
    echo: bool = True,
) -> dict[str, Any] | None:
    """Run (or resume) ``study`` into the folder ``out``; see the module docstring.

    Parameters
    ----------
    study
        The :class:`~smoothguide.study.Study`.
    out
        Output folder (created; refused if it holds another study).
    dist
        The process group (default :func:`~smoothguide.study.dist.init_dist`).
    progress
        tqdm bars (one per rank; rank 0 adds the global count and ETA).
    cpu
        Force the CPU.
    echo
        Print the final summary (rank 0).

    Returns
    -------
    dict or None
        The content of ``metrics.json`` on rank 0, ``None`` on other ranks.

    Examples
    --------
    >>> import tempfile
    >>> from smoothguide.study import RuleGrid, SamplerSettings, Study
    >>> study = Study("doc", rules=(RuleGrid("SEG", scale=1.0, sigma=2.0),), labels=(3,),
    ...               seeds=2, metrics=("rms", "ink"), sampler=SamplerSettings(steps=2))
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     m = run_study(study, tmp, progress=False, echo=False)
    >>> [(r["name"], r["rms"] > 0) for r in m["settings"]]
    [('none', False), ('SEG scale=1 sigma=2', True)]
    """

    t_start = time.perf_counter()
    study.validate()
    check_feature_weights(study.features, study.feature_options, study.metrics)
    check_metric_weights(study.metrics, study.metric_options)
    owns_dist = dist is None
    dist = dist or init_dist(cpu=cpu)
    try:
        result = _run(study, out, dist, progress=progress, echo=echo, t_start=t_start)
        if owns_dist:
            # every rank leaves together: a rank exiting while another is still inside a
            # gloo collective makes the latter abort
            dist.barrier()
        return result
    finally:
        if owns_dist:
            dist.close()


def _run(
    study: Study, out: str, dist: Dist, *, progress: bool, echo: bool, t_start: float
) -> dict[str, Any] | None:
    import torch

    if study.sampler.threads is not None:
        torch.set_num_threads(study.sampler.threads)
    store = Store(out)
    definition, digest = study.to_dict(), study.definition_hash()
    existed = store.check_definition(definition, digest)
    model = resolve_model(study.model)(study.model_options, dist.device)
    extractor = (
        load_extractor(study.features, study.feature_options, dist.device)
        if _feature_metrics(study)
        else None
    )
    nets = load_metric_nets(study.metrics, study.metric_options, dist.device)
    if dist.is_main:
        if not existed:
            store.write_definition(definition, digest)
        store.clean_tmp()
        if extractor is not None and any(m in ("fd", "kid") for m in study.metrics):
            _write_reference(study, store, model, extractor)
    dist.barrier()
    store.clean_partial(dist.rank)
    settings, items = study.settings(), study.items()
    units = make_units(len(settings), len(items), study.seeds, study.unit_size)
    phases = [[u for u in units if u.setting == 0], [u for u in units if u.setting > 0]]
    mine = [u for p in phases for u in shard(p, dist.rank, dist.world)]
    # each rank re-hashes only its own (static) shard
    done = store.done(only={u.uid for u in mine})
    todo = [u for u in mine if u.uid not in done]
    n_global = len(store.done(verify=False))
    t_count = time.perf_counter()
    kill_after = _kill_hook(dist.rank)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(todo),
        desc=f"rank {dist.rank}",
        position=dist.rank,
        disable=not progress,
        leave=True,
        dynamic_ncols=True,
    )
    stats = {"units": 0, "samples": 0, "sample_s": 0.0, "unit_s": 0.0, "store_s": 0.0}
    done_at_start = len(done)
    n_start = n_global
    t_loop = time.perf_counter()
    for phase in phases:
        for unit in shard(phase, dist.rank, dist.world):
            if unit.uid in done:
                continue
            t0 = time.perf_counter()
            blob, body, t_sample = _sample_unit(
                study, settings, items, unit, model, extractor, store, nets
            )
            t1 = time.perf_counter()
            kill = None
            if kill_after is not None and stats["units"] >= kill_after:

                def kill() -> None:
                    os.kill(os.getpid(), signal.SIGKILL)

            store.write_unit(unit.uid, blob, body, dist.rank, kill=kill)
            t2 = time.perf_counter()
            stats["units"] += 1
            stats["samples"] += len(unit.items)
            stats["sample_s"] += t_sample
            stats["unit_s"] += t1 - t0
            stats["store_s"] += t2 - t1
            bar.update(1)
            if dist.is_main and progress:
                now = time.perf_counter()
                if now - t_count > 5.0 or n_global == 0:  # re-reading the index costs O(units)
                    n_global, t_count = len(store.done(verify=False)), now
                else:
                    n_global += dist.world  # estimate: the others advance like this rank
                n_global = min(n_global, len(units))
                rate = (n_global - n_start) / max(now - t_loop, 1e-9)
                eta = (len(units) - n_global) / rate if rate > 0 else math.inf
                bar.set_postfix_str(f"global {n_global}/{len(units)} ETA {_fmt_s(eta)}")
        dist.barrier()
    bar.close()
    loop_s = time.perf_counter() - t_loop
    metrics = reduce_metrics(study, store, dist)
    wall = time.perf_counter() - t_start
    vec = torch.tensor(
        [stats[k] for k in ("units", "samples", "sample_s", "unit_s", "store_s")]
        + [loop_s, done_at_start],
        dtype=torch.float64,
    )
    tot = dist.all_reduce_sum(vec).tolist()
    if dist.is_main:
        summary: dict[str, Any] = {
            "processes": dist.world,
            "launcher": dist.launcher,
            "units_total": len(units),
            "units_run": int(tot[0]),
            "samples_run": int(tot[1]),
            "units_already_done": int(tot[6]),
            "wall_seconds": wall,
            "seconds_per_unit": tot[3] / tot[0] if tot[0] else None,
            "seconds_per_sample": tot[3] / tot[1] if tot[1] else None,
            "sampling_seconds_per_unit": tot[2] / tot[0] if tot[0] else None,
            "store_seconds_per_unit": tot[4] / tot[0] if tot[0] else None,
            "store_overhead_ratio": tot[4] / tot[2] if tot[2] else None,
            "loop_seconds": tot[5] / dist.world,
            # throughput of the sampling loop (barriers included, start-up excluded)
            "units_per_second": tot[0] * dist.world / tot[5] if tot[5] else None,
        }
        store.write_json("summary.json", summary)
        if echo:
            spu = summary["seconds_per_unit"]
            sps = summary["seconds_per_sample"]
            print(
                f"study {study.name!r}: {summary['units_run']} units run now, "
                f"{int(tot[6])} already done, {len(units)} total, on {dist.world} "
                f"process(es) in {wall:.1f} s"
                + (
                    f"; {spu:.3f} s per unit, {sps:.4f} s per sample "
                    f"(per process), store {summary['store_seconds_per_unit'] * 1e3:.1f} ms "
                    "per unit"
                    if spu is not None and sps is not None
                    else ""
                )
                + f"; metrics in {os.path.join(out, 'metrics.json')}"
            )
    return metrics if dist.is_main else None


def reduce_metrics(study: Study, store: Store, dist: Dist) -> dict[str, Any] | None:
    """Sum every rank's shard of the store, reduce across ranks; rank 0 writes ``metrics.json``.

    Every rank must call it. The sums are float64; the KID reservoir keeps the
    ``kid_subset`` samples with the smallest noise seed per setting.

    Parameters
    ----------
    study
        The study.
    store
        Its complete store.
    dist
        The process group.

    Returns
    -------
    dict or None
        The metrics on rank 0, ``None`` elsewhere.

    Examples
    --------
    Called at the end of :func:`run_study`; by hand on a finished folder:
    ``reduce_metrics(study, Store("demo-study"), Dist())`` rewrites its ``metrics.json``.
    """
    import torch

    settings, items = study.settings(), study.items()
    units = make_units(len(settings), len(items), study.seeds, study.unit_size)
    phases = [[u for u in units if u.setting == 0], [u for u in units if u.setting > 0]]
    mine = [u for p in phases for u in shard(p, dist.rank, dist.world)]
    done = store.done(verify=False)
    missing = [u.uid for u in units if u.uid not in done]
    if missing:
        raise RuntimeError(f"{len(missing)} units missing from the store, e.g. {missing[:3]}")
    scal = [m for m in study.metrics if m in SCALAR_METRICS]
    S, K = len(settings), study.kid_subset
    sums = torch.zeros(S, max(len(scal), 1), 2, dtype=torch.float64)
    use_fd = "fd" in study.metrics
    use_kid = "kid" in study.metrics
    d = 0
    if use_fd or use_kid:
        probe = store.read_tensors(units[0].uid, ("features",))
        d = probe["features"].shape[1]
    fd = torch.zeros(S, 1 + d + d * d, dtype=torch.float64) if use_fd else None
    res_p = torch.full((S, K), _PAD, dtype=torch.int64) if use_kid else None
    res_f = torch.zeros(S, K, d, dtype=torch.float32) if use_kid else None
    for u in mine:
        body = store.read_rows(u.uid)
        for j, m in enumerate(scal):
            vals = [r[m] for r in body["rows"] if r.get(m) is not None]
            sums[u.setting, j, 0] += float(np.sum(np.asarray(vals, dtype=np.float64)))
            sums[u.setting, j, 1] += len(vals)
        if use_fd or use_kid:
            t = store.read_tensors(u.uid, ("features", "noise_seed"))
            f = t["features"].double()
            if fd is not None:
                fd[u.setting, 0] += f.shape[0]
                fd[u.setting, 1 : 1 + d] += f.sum(0)
                fd[u.setting, 1 + d :] += (f.T @ f).reshape(-1)
            if res_p is not None and res_f is not None:
                p = torch.cat([res_p[u.setting], t["noise_seed"]])
                ff = torch.cat([res_f[u.setting], t["features"].float()])
                order = torch.sort(p, stable=True).indices[:K]
                res_p[u.setting], res_f[u.setting] = p[order], ff[order]
    sums = dist.all_reduce_sum(sums)
    if fd is not None:
        fd = dist.all_reduce_sum(fd)
    if res_p is not None and res_f is not None:
        ps, fs = dist.all_gather(res_p), dist.all_gather(res_f)
        p, ff = torch.cat(ps, dim=1), torch.cat(fs, dim=1)
        order = torch.sort(p, dim=1, stable=True).indices[:, :K]
        res_p = torch.gather(p, 1, order)
        res_f = torch.gather(ff, 1, order[..., None].expand(-1, -1, d))
    if not dist.is_main:
        return None
    ref = None
    ref_path = os.path.join(store.root, REFERENCE_FILE)
    if (use_fd or use_kid) and os.path.exists(ref_path):
        from safetensors.torch import load_file

        ref = load_file(ref_path)["features"].double().numpy()
    rows = []
    for s, st in enumerate(settings):
        row: dict[str, Any] = {"setting": s, "family": st.family, "name": st.name}
        row["spec"] = st.spec
        for j, m in enumerate(scal):
            c = float(sums[s, j, 1])
            row[m] = float(sums[s, j, 0]) / c if c else None
        if fd is not None:
            n = float(fd[s, 0])
            row["n"] = int(n)
            if ref is not None:
                a = (n, fd[s, 1 : 1 + d].numpy(), fd[s, 1 + d :].reshape(d, d).numpy())
                b = (float(ref.shape[0]), ref.sum(0), ref.T @ ref)
                row["fd"] = frechet_from_sums(a, b)
        if res_p is not None and res_f is not None and ref is not None:
            keep = res_p[s] != _PAD
            row["kid"] = kid_unbiased(res_f[s][keep].double().numpy(), ref[:K])
        rows.append(row)
    metrics = {
        "study": study.name,
        "hash": study.definition_hash(),
        "samples_per_setting": len(items) * study.seeds,
        "steps": study.sampler.steps,
        "features": study.features if (use_fd or use_kid) else None,
        "reference_samples": None if ref is None else int(ref.shape[0]),
        "kid_subset": K if use_kid else None,
        "metrics": list(study.metrics),
        "settings": rows,
    }
    store.write_json("metrics.json", metrics)
    return metrics
