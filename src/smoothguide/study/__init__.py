"""Guidance studies at scale: sweeps and quality metrics, sharded, resumable, nothing lost.

A :class:`Study` (Python or TOML, :func:`load_study`) is a model factory, a grid
of rule settings (:class:`RuleGrid`, :func:`compose`), labels or prompts, seeds,
sampler settings and metrics. :func:`run_study` (``smoothguide study run``) splits
its work units over the processes of ``accelerate launch`` / ``torchrun`` (or runs
in-process) and writes them to a :class:`Store` that survives being killed;
:func:`write_report` (``smoothguide study report``) reads only the store.

Needs the ``study`` extra (``pip install smoothguide[study]``); the demo model needs
``smoothguide[demo]``. Modules: ``definition``, ``units``, ``store``, ``dist``,
``metrics`` (with ``clip`` and ``lpips``), ``models``, ``runner``, ``report``, ``cli``.
"""

from __future__ import annotations

from .definition import RuleGrid, SamplerSettings, Setting, Study, StudyError, compose, load_study
from .store import Store
from .units import Unit, make_units, noise_seed, shard

__all__ = [
    "RuleGrid",
    "SamplerSettings",
    "Setting",
    "Store",
    "Study",
    "StudyError",
    "Unit",
    "compose",
    "load_study",
    "make_units",
    "noise_seed",
    "run_study",
    "shard",
    "write_report",
]


def __getattr__(name: str) -> object:
    # runner / report import torch; keep `import smoothguide.study` light
    if name == "run_study":
        from .runner import run_study

        return run_study
    if name == "write_report":
        from .report import write_report

        return write_report
    raise AttributeError(name)
