"""smoothguide: Smoothed Energy Guidance and sibling guidance rules for diffusion models.

The core (token grids, query smoothing, attention energy, guidance rules,
samplers) works on any Python array-API backend; PyTorch models are reached
through :mod:`smoothguide.torch` and :mod:`smoothguide.diffusers`.
"""

from .branches import Branch, Perturber
from .energy import (
    attention,
    attention_energy,
    attention_logits,
    diagonal_curvature_logdet,
    lse_energy,
    lse_energy_grad,
    lse_energy_hessian,
    smoothed_energy_hessian,
)
from .grid import TokenGrid
from .layer_skip import LayerSkip
from .perturbations import IdentityAttention, Perturbation, QuerySmoothing
from .rules import (
    APG,
    CFG,
    FDG,
    MAMBOG,
    PAG,
    SAG,
    SEG,
    SLG,
    TCFG,
    TPG,
    Autoguidance,
    CFGPlusPlus,
    CFGZeroStar,
    Compose,
    Constant,
    CosineRamp,
    GuidanceRule,
    GuidanceTerm,
    Interval,
    LinearRamp,
    Prediction,
    Rescale,
    StepContext,
)
from .sag import AttentionMaskedBlur
from .sampling import GuidedDenoiser, karras_sigmas, sample_ddim, sample_euler
from .smoothing import blur_matrix, default_radius, gaussian_kernel1d, smooth_queries
from .token_permutation import TokenPermutation
from .weak_model import WeakModel

__version__ = "0.1.0"

__all__ = [
    "APG",
    "CFG",
    "FDG",
    "MAMBOG",
    "PAG",
    "SAG",
    "SEG",
    "SLG",
    "TCFG",
    "TPG",
    "AttentionMaskedBlur",
    "Autoguidance",
    "Branch",
    "CFGPlusPlus",
    "CFGZeroStar",
    "Compose",
    "Constant",
    "CosineRamp",
    "GuidanceRule",
    "GuidanceTerm",
    "GuidedDenoiser",
    "IdentityAttention",
    "Interval",
    "LayerSkip",
    "LinearRamp",
    "Perturbation",
    "Perturber",
    "Prediction",
    "QuerySmoothing",
    "Rescale",
    "StepContext",
    "TokenGrid",
    "TokenPermutation",
    "WeakModel",
    "__version__",
    "attention",
    "attention_energy",
    "attention_logits",
    "blur_matrix",
    "default_radius",
    "diagonal_curvature_logdet",
    "gaussian_kernel1d",
    "karras_sigmas",
    "lse_energy",
    "lse_energy_grad",
    "lse_energy_hessian",
    "sample_ddim",
    "sample_euler",
    "smooth_queries",
    "smoothed_energy_hessian",
]
