"""Train the demo models: ``python -m smoothguide.demo.train``.

A one-off job for a developer machine, not for CI. It first trains the feature
network / classifier (:class:`~smoothguide.demo.model.DemoClassifier`, about a
minute) and reports its held-out accuracy, then trains the class-conditional
epsilon-prediction :class:`~smoothguide.demo.model.DemoDiT` with AdamW, label
dropout to the null class (so CFG and unconditional sampling work) and an EMA of
the weights. It is seeded, shows a tqdm bar (``--no-progress`` turns it off),
writes a resumable checkpoint every ``--checkpoint-every`` steps (safetensors +
JSON, no pickle), stops gracefully at ``--steps`` or after ``--max-minutes`` and
finally exports the EMA weights, the classifier and a provenance JSON to
``--out`` (default: a new ``smoothguide-demo-weights`` folder in the current
directory; the shipped weights in the package's ``weights/`` folder are only
replaced with ``--out`` naming that folder and ``--force``).

Example::

    python -m smoothguide.demo.train --steps 30000 --max-minutes 95 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from ._cli import check_device, check_out_dir, check_seed, run_main
from ._deps import require, torch
from .data import load_demo_data
from .model import (
    NULL_CLASS,
    SIGMA_MAX,
    SIGMA_MIN,
    ClassifierConfig,
    DemoClassifier,
    DemoDenoiser,
    DemoDiT,
    DiTConfig,
    sigma_to_t,
)
from .weights import (
    CLASSIFIER_FILE,
    CONFIG_FILE,
    DIT_FILE,
    WEIGHTS_DIR,
    load_tensors,
    save_tensors,
)

F = torch.nn.functional

__all__ = ["build_parser", "main"]

_STATE_TENSORS = "state.safetensors"
#: Wall clock of the time budget and the rate log (a seam for the budget test).
_clock = time.monotonic
_STATE_JSON = "state.json"


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of the training script.

    Returns
    -------
    argparse.ArgumentParser
        The options of ``python -m smoothguide.demo.train`` (``--help`` lists them).

    Examples
    --------
    >>> args = build_parser().parse_args(["--steps", "100", "--threads", "2"])
    >>> args.steps, args.threads, args.depth, args.dtype
    (100, 2, 5, 'float16')
    """
    p = argparse.ArgumentParser(
        prog="smoothguide train-demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=30000, help="diffusion optimizer steps")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop gracefully after this wall time (this run) and still save",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: torch's)")
    p.add_argument("--batch-size", type=int, default=64, help="diffusion batch size")
    p.add_argument("--lr", type=float, default=4e-4, help="AdamW learning rate")
    p.add_argument("--warmup", type=int, default=500, help="linear learning-rate warm-up steps")
    p.add_argument("--ema", type=float, default=0.9995, help="EMA decay")
    p.add_argument(
        "--label-dropout", type=float, default=0.12, help="fraction of labels set to the null class"
    )
    dit = DiTConfig()
    p.add_argument("--hidden", type=int, default=dit.hidden, help="DiT hidden width")
    p.add_argument("--depth", type=int, default=dit.depth, help="DiT blocks")
    p.add_argument("--heads", type=int, default=dit.heads, help="DiT attention heads")
    p.add_argument(
        "--classifier-epochs", type=int, default=10, help="epochs of the classifier training"
    )
    p.add_argument(
        "--classifier-steps", type=int, default=None, help="cap on classifier steps (tests)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the split, init and batches")
    p.add_argument(
        "--checkpoint-dir",
        default="smoothguide-demo-train",
        help="directory of the resumable checkpoint",
    )
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument(
        "--out",
        default="smoothguide-demo-weights",
        help="where the final weights go (never the shipped weights folder without --force)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="allow --out to be the package's shipped weights folder (replaces them)",
    )
    p.add_argument(
        "--dtype",
        choices=["float16", "float32"],
        default="float16",
        help="storage dtype of the exported DiT weights",
    )
    p.add_argument(
        "--export-only",
        action="store_true",
        help="only export the weights of an existing checkpoint",
    )
    p.add_argument(
        "--preview-per-class", type=int, default=10, help="CFG samples per digit in the final check"
    )
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps, ...)")
    p.add_argument("--no-progress", action="store_true", help="disable the tqdm bar")
    return p


def _log(msg: str) -> None:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%H:%M:%S")
    print(f"[{stamp}] {msg}", flush=True)


def _shift_augment(x: Any, gen: Any) -> Any:
    """Random translations by up to one pixel (zero = background -1 padding)."""
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx = torch.randint(0, 3, (b,), generator=gen)
    dy = torch.randint(0, 3, (b,), generator=gen)
    out = torch.empty_like(x)
    for i in range(b):
        out[i] = padded[i, :, dy[i] : dy[i] + 16, dx[i] : dx[i] + 16]
    return out


def _train_classifier(
    data: Any, epochs: int, seed: int, progress: bool, device: Any, max_steps: int | None = None
) -> tuple[Any, float]:
    tqdm = require("tqdm").tqdm
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    net = DemoClassifier(ClassifierConfig()).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    x = torch.from_numpy(data.train_images)
    y = torch.from_numpy(data.train_labels)
    n, bs = x.shape[0], 128
    steps = epochs * math.ceil(n / bs)
    if max_steps is not None:
        steps = min(steps, max_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    bar = tqdm(total=steps, desc="classifier", disable=not progress, mininterval=2.0)
    net.train()
    done = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, bs):
            if done == steps:
                break
            done += 1
            idx = perm[i : i + bs]
            xb = _shift_augment(x[idx], gen).to(device)
            loss = F.cross_entropy(net(xb), y[idx].to(device), label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    net.eval()
    with torch.no_grad():
        pred = net(torch.from_numpy(data.test_images).to(device)).argmax(1).cpu()
    acc = float((pred == torch.from_numpy(data.test_labels)).float().mean())
    return net, acc


def _karras_sigmas(n: int, smin: float = SIGMA_MIN, smax: float = SIGMA_MAX) -> Any:
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    rho = 7.0
    s = (smax ** (1 / rho) + ramp * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    return torch.cat([s, s.new_zeros(1)]).float()


@torch.no_grad()
def _preview_cfg_accuracy(
    den: DemoDenoiser, clf: DemoClassifier, n_per_class: int, scale: float, seed: int
) -> float:
    """Training-time check only: CFG Euler samples, fraction classified as their class.

    (The demo and tests guide through the public rules and samplers; this private
    loop just logs progress during training.)
    """
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat_interleave(n_per_class)
    b = labels.shape[0]
    sig = _karras_sigmas(30)
    x = torch.randn(b, 1, 16, 16, generator=gen) * sig[0]
    for i in range(len(sig) - 1):
        s = sig[i].expand(b)
        d_c = den(x, s, class_labels=labels)
        d_u = den(x, s, class_labels=NULL_CLASS)
        d = d_u + scale * (d_c - d_u)
        x = x + (x - d) / sig[i] * (sig[i + 1] - sig[i])
    pred = clf(x.clamp(-1, 1)).argmax(1)
    return float((pred == labels).float().mean())


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _save_checkpoint(ckpt_dir: str, parts: dict[str, Any], meta: dict[str, Any]) -> None:
    os.makedirs(ckpt_dir, exist_ok=True)
    tensors: dict[str, Any] = {}
    for prefix in ("model", "ema", "clf"):
        if parts.get(prefix) is not None:
            for k, v in parts[prefix].state_dict().items():
                tensors[f"{prefix}.{k}"] = v
    opt_state = parts["opt"].state_dict()
    for idx, st in opt_state["state"].items():
        for k, v in st.items():
            tensors[f"opt.{idx}.{k}"] = torch.as_tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    tensors["rng.gen"] = parts["gen"].get_state()
    save_tensors(tensors, os.path.join(ckpt_dir, _STATE_TENSORS))
    meta = dict(meta, param_groups=opt_state["param_groups"])
    tmp = os.path.join(ckpt_dir, _STATE_JSON + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=1)
    os.replace(tmp, os.path.join(ckpt_dir, _STATE_JSON))


def _load_checkpoint(ckpt_dir: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    jpath = os.path.join(ckpt_dir, _STATE_JSON)
    if not os.path.exists(jpath):
        return None
    with open(jpath, encoding="utf-8") as fh:
        meta: dict[str, Any] = json.load(fh)
    return load_tensors(os.path.join(ckpt_dir, _STATE_TENSORS)), meta


def _sub(tensors: dict[str, Any], prefix: str) -> dict[str, Any]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _export(out: str, ema: Any, clf: Any, meta: dict[str, Any], dtype: str) -> dict[str, Any]:
    os.makedirs(out, exist_ok=True)
    tdtype = torch.float16 if dtype == "float16" else torch.float32
    dit_sd = {k: v.to(tdtype) for k, v in ema.state_dict().items()}
    dit_hash = save_tensors(dit_sd, os.path.join(out, DIT_FILE))
    clf_hash = save_tensors(clf.state_dict(), os.path.join(out, CLASSIFIER_FILE))
    config = {
        "format": "smoothguide-demo-weights/1",
        "dit": meta["dit"],
        "classifier": meta["classifier"],
        "schedule": {
            "kind": "cosine-vp epsilon-prediction; VE sigma = tan(pi t / 2)",
            "sigma_min": SIGMA_MIN,
            "sigma_max": SIGMA_MAX,
            "null_class": NULL_CLASS,
        },
        "training": {
            "steps": meta["step"],
            "batch_size": meta["args"]["batch_size"],
            "lr": meta["args"]["lr"],
            "ema": meta["args"]["ema"],
            "label_dropout": meta["args"]["label_dropout"],
            "seed": meta["args"]["seed"],
            "wall_seconds": round(meta["elapsed"], 1),
            "steps_per_second": round(meta["step"] / max(meta["elapsed_diffusion"], 1e-9), 3),
            "threads": meta["args"]["threads"],
            "classifier_test_accuracy": meta["classifier_acc"],
            "final_loss_ema": meta.get("loss_ema"),
            "preview_cfg_accuracy": meta.get("preview_cfg_accuracy"),
        },
        "data": meta["data"],
        "commit": _git_commit(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "files": {
            DIT_FILE: {"sha256": dit_hash, "dtype": dtype},
            CLASSIFIER_FILE: {"sha256": clf_hash, "dtype": "float32"},
        },
    }
    with open(os.path.join(out, CONFIG_FILE), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
        fh.write("\n")
    return config


def main(argv: Sequence[str] | None = None) -> int:
    """Run the training job; returns the process exit code.

    Trains (or resumes) the classifier and the DiT, checkpointing to
    ``--checkpoint-dir``, then exports the EMA weights, the classifier and
    ``config.json`` to ``--out`` (see the module docstring).

    Parameters
    ----------
    argv
        Command-line arguments (default ``sys.argv[1:]``); see :func:`build_parser`.

    Returns
    -------
    int
        0 once the weights are exported.

    Raises
    ------
    SystemExit
        For invalid options (a count below 1, a negative seed, an unwritable
        ``--out``, a device this machine lacks, ``--out`` naming the shipped
        weights folder without ``--force``), a checkpoint of another model
        config, or ``--export-only`` without a checkpoint. An interrupt prints
        one line and returns 130.

    Examples
    --------
    Options are checked before anything is loaded or trained:

    >>> main(["--steps", "0"])
    Traceback (most recent call last):
    ...
    SystemExit: --steps must be >= 1
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in (
        "steps",
        "batch_size",
        "checkpoint_every",
        "classifier_epochs",
        "preview_per_class",
    ):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("threads", "classifier_steps", "warmup"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    if not 0 <= args.ema < 1:
        parser.error(f"--ema must be in [0, 1), got {args.ema}")
    if not 0 <= args.label_dropout <= 1:
        parser.error(f"--label-dropout must be in [0, 1], got {args.label_dropout}")
    if args.max_minutes is not None and not args.max_minutes > 0:
        parser.error(f"--max-minutes must be > 0, got {args.max_minutes}")
    if args.heads < 1 or args.depth < 3:
        parser.error(
            f"--heads must be >= 1 and --depth >= 3 (the early/middle/late layer presets), "
            f"got {args.heads} and {args.depth}"
        )
    if args.hidden < 4 or args.hidden % 4 or args.hidden % args.heads:
        parser.error(
            f"--hidden must be a multiple of 4 (2-D position embedding) and of --heads "
            f"{args.heads}, got {args.hidden}"
        )
    check_seed(parser, args.seed)
    if _same_dir(args.out, WEIGHTS_DIR) and not args.force:
        parser.error(
            f"--out {args.out} is the package's shipped weights folder; training would replace "
            "the demo's weights: pass another --out, or --force to replace them"
        )
    check_out_dir(parser, args.out)
    check_out_dir(parser, args.checkpoint_dir, "--checkpoint-dir")
    check_device(parser, args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return run_main("smoothguide train-demo", lambda: _train(args), out=args.out)


def _same_dir(a: str, b: str) -> bool:
    return os.path.realpath(os.path.abspath(a)) == os.path.realpath(os.path.abspath(b))


def _train(args: argparse.Namespace) -> int:
    """The training job of :func:`main`, on checked arguments."""
    tqdm = require("tqdm").tqdm
    progress = not args.no_progress
    t_start = job_start = _clock()
    budget = None if args.max_minutes is None else args.max_minutes * 60.0
    device = torch.device(args.device)

    data = load_demo_data(seed=args.seed)
    dit_cfg = DiTConfig(hidden=args.hidden, depth=args.depth, heads=args.heads)
    torch.manual_seed(args.seed)
    model = DemoDiT(dit_cfg).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 2)
    clf = None
    meta: dict[str, Any] = {
        "step": 0,
        "elapsed": 0.0,
        "elapsed_diffusion": 0.0,
        "classifier_acc": None,
        "args": vars(args),
        "dit": dit_cfg.to_dict(),
        "classifier": ClassifierConfig().to_dict(),
        "data": {
            "file": "smoothguide/demo/mnist/mnist_5k.npz",
            "sha256": data.source_sha256,
            "split_seed": data.seed,
            "train": int(data.train_images.shape[0]),
            "held_out": int(data.test_images.shape[0]),
            "image_size": 16,
            "resize": "exact area average 28->16, scaled to [-1, 1]",
        },
    }

    ckpt = None if args.no_resume else _load_checkpoint(args.checkpoint_dir)
    if ckpt is not None:
        tensors, old = ckpt
        if old["dit"] != meta["dit"]:
            raise SystemExit(
                f"checkpoint in {args.checkpoint_dir} has model config {old['dit']}, "
                f"not {meta['dit']}; use --no-resume or another --checkpoint-dir"
            )
        model.load_state_dict(_sub(tensors, "model"))
        ema.load_state_dict(_sub(tensors, "ema"))
        opt_sd: dict[str, Any] = {"state": {}, "param_groups": old["param_groups"]}
        for k, v in _sub(tensors, "opt").items():
            idx, name = k.split(".", 1)
            opt_sd["state"].setdefault(int(idx), {})[name] = v
        opt.load_state_dict(opt_sd)
        torch.set_rng_state(tensors["rng.torch"])
        gen.set_state(tensors["rng.gen"])
        if any(k.startswith("clf.") for k in tensors):
            clf = DemoClassifier(ClassifierConfig()).to(device)
            clf.load_state_dict(_sub(tensors, "clf"))
            clf.eval()
        for key in (
            "step",
            "elapsed",
            "elapsed_diffusion",
            "classifier_acc",
            "loss_ema",
            "preview_cfg_accuracy",
        ):
            if key in old:
                meta[key] = old[key]
        _log(f"resumed from {args.checkpoint_dir} at step {meta['step']}")

    parts = {"model": model, "ema": ema, "opt": opt, "gen": gen, "clf": clf}

    if args.export_only:
        if ckpt is None or clf is None:
            raise SystemExit(
                f"--export-only needs a checkpoint with a classifier in {args.checkpoint_dir}"
            )
        cfg = _export(args.out, ema, clf, meta, args.dtype)
        _log(f"exported step {meta['step']} to {args.out}: {json.dumps(cfg['files'])}")
        return 0

    if clf is None:
        _log("training the classifier / feature network")
        t0 = _clock()
        clf, acc = _train_classifier(
            data, args.classifier_epochs, args.seed, progress, device, args.classifier_steps
        )
        meta["classifier_acc"] = round(acc, 4)
        parts["clf"] = clf
        _log(f"classifier held-out accuracy {acc:.4f} ({_clock() - t0:.0f} s)")
        _save_checkpoint(args.checkpoint_dir, parts, meta)

    x_all = torch.from_numpy(data.train_images)
    y_all = torch.from_numpy(data.train_labels)
    n = x_all.shape[0]
    t_lo = float(sigma_to_t(torch.tensor(SIGMA_MIN, dtype=torch.float64)))
    t_hi = float(sigma_to_t(torch.tensor(SIGMA_MAX, dtype=torch.float64)))
    bar = tqdm(
        total=args.steps,
        initial=meta["step"],
        desc="diffusion",
        disable=not progress,
        mininterval=2.0,
    )
    loss_ema = meta.get("loss_ema") or 1.0
    run_start = first_start = _clock()
    step_start = meta["step"]
    model.train()
    stopped_by_budget = False
    while meta["step"] < args.steps:
        # job_start, not t_start: t_start restarts at every checkpoint (elapsed bookkeeping)
        if budget is not None and _clock() - job_start > budget:
            stopped_by_budget = True
            break
        step = meta["step"]
        batch_idx = torch.randint(0, n, (args.batch_size,), generator=gen)
        x0 = x_all[batch_idx].to(device)
        y = y_all[batch_idx].clone()
        drop = torch.rand(args.batch_size, generator=gen) < args.label_dropout
        y[drop] = NULL_CLASS
        u = (torch.arange(args.batch_size) + torch.rand(1, generator=gen)) / args.batch_size
        t = (t_lo + (t_hi - t_lo) * u[torch.randperm(args.batch_size, generator=gen)]).to(device)
        eps = torch.randn(x0.shape, generator=gen).to(device)
        a = torch.cos(t * (math.pi / 2))[:, None, None, None]
        s = torch.sin(t * (math.pi / 2))[:, None, None, None]
        loss = F.mse_loss(model(a * x0 + s * eps, t, y.to(device)), eps)
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
                pe.lerp_(pm, 1 - decay)
        meta["step"] = step + 1
        loss_ema = 0.99 * loss_ema + 0.01 * loss.item()
        meta["loss_ema"] = round(loss_ema, 5)
        bar.update(1)
        if meta["step"] % 50 == 0:
            bar.set_postfix(loss=f"{loss_ema:.4f}", refresh=False)
        if meta["step"] % args.checkpoint_every == 0:
            now = _clock()
            meta["elapsed"] += now - t_start
            meta["elapsed_diffusion"] += now - run_start
            t_start, run_start = now, now
            _save_checkpoint(args.checkpoint_dir, parts, meta)
            rate = (meta["step"] - step_start) / max(1e-9, now - first_start)
            _log(f"step {meta['step']} loss(ema) {loss_ema:.4f} {rate:.2f} steps/s, saved")
    bar.close()
    now = _clock()
    meta["elapsed"] += now - t_start
    meta["elapsed_diffusion"] += now - run_start
    if stopped_by_budget:
        _log(f"time budget of {args.max_minutes} min reached at step {meta['step']}")
    den = DemoDenoiser(copy.deepcopy(ema).eval())
    assert clf is not None
    acc = _preview_cfg_accuracy(
        den, clf.eval(), n_per_class=args.preview_per_class, scale=2.0, seed=args.seed
    )
    meta["preview_cfg_accuracy"] = round(acc, 4)
    _log(f"preview: CFG(2) Euler-30 samples classified as their class: {acc:.3f}")
    _save_checkpoint(args.checkpoint_dir, parts, meta)
    cfg = _export(args.out, ema, clf, meta, args.dtype)
    _log(
        f"saved weights to {args.out} (step {meta['step']}, "
        f"{cfg['training']['steps_per_second']} steps/s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
