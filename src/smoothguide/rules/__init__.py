"""Guidance rules: CFG, SEG, PAG, APG, CFG-Zero*, TCFG, FDG, MAMBO-G, CFG++, rescale, schedules.

A rule declares the branch outputs it needs at a step and combines them; it
never calls the model (see :mod:`smoothguide.rules.base`). Every built-in rule is
also a term that :class:`Compose` can chain, and every term can carry a schedule.
The table of formulas, neutral values, branches and sources is ``docs/rules.md``.
"""

from ._prediction import Prediction
from .apg import APG
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
from .cfg_zero_star import CFGZeroStar
from .cfgpp import CFGPlusPlus
from .compose import Compose
from .fdg import FDG
from .mambo import MAMBOG
from .pag import PAG
from .rescale import Rescale
from .schedules import Constant, CosineRamp, Interval, LinearRamp, Schedule
from .seg import SEG
from .tcfg import TCFG

__all__ = [
    "APG",
    "CFG",
    "COND",
    "FDG",
    "MAMBOG",
    "PAG",
    "SEG",
    "TCFG",
    "UNCOND",
    "CFGPlusPlus",
    "CFGZeroStar",
    "Compose",
    "Constant",
    "CosineRamp",
    "GuidanceRule",
    "GuidanceTerm",
    "Interval",
    "LinearRamp",
    "Prediction",
    "Rescale",
    "Schedule",
    "StepContext",
    "Term",
    "branch_output",
]
