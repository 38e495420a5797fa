"""Guidance rules: CFG, SEG, PAG, SAG, SLG, TPG, autoguidance, APG, rescale, schedules, composition.

A rule declares the branch outputs it needs at a step and combines them; it
never calls the model (see :mod:`smoothguide.rules.base`). Every built-in rule is
also a term that :class:`Compose` can chain, and every term can carry a schedule.
The table of formulas, neutral values, branches and sources is ``docs/rules.md``.
"""

from .apg import APG
from .autoguidance import Autoguidance
from .base import (
    COND,
    UNCOND,
    GuidanceRule,
    GuidanceTerm,
    StepContext,
    Term,
    branch_output,
)
from .cfg import CFG
from .compose import Compose
from .pag import PAG
from .rescale import Rescale
from .sag import SAG
from .schedules import Constant, CosineRamp, Interval, LinearRamp, Schedule
from .seg import SEG
from .slg import SLG
from .tpg import TPG

__all__ = [
    "APG",
    "CFG",
    "COND",
    "PAG",
    "SAG",
    "SEG",
    "SLG",
    "TPG",
    "UNCOND",
    "Autoguidance",
    "Compose",
    "Constant",
    "CosineRamp",
    "GuidanceRule",
    "GuidanceTerm",
    "Interval",
    "LinearRamp",
    "Rescale",
    "Schedule",
    "StepContext",
    "Term",
    "branch_output",
]
