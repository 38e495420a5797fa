"""A guidance study: model, grid of rule settings, labels or prompts, seeds, sampler, metrics.

A :class:`Study` is plain data, defined in Python or loaded from TOML with
:func:`load_study`. :meth:`Study.validate` checks everything that can be checked
without loading a model (rule parameters, σ ≥ 0, metric names, the prompts file,
the model factory's labels) and raises :class:`StudyError` naming the key and the
accepted values, so a bad study fails before any sampling starts.
:meth:`Study.definition_hash` (SHA-256 of the canonical JSON) identifies a study;
an output folder written by one study refuses another.

TOML form (``examples/studies/demo_pareto.toml``)::

    name = "demo_pareto"
    seed = 0                      # study seed: every sample's noise derives from it
    model = "demo"                # a registered factory or "package.module:function"
    labels = ["null"]             # class labels ("null" = unconditional) ...
    # prompts = "prompts.txt"     # ... or a prompts file, one prompt per line
    seeds = 32                    # seed indices per label / prompt
    unit_size = 16                # samples per work unit
    metrics = ["fd", "kid", "rms", "ssim", "ink", "confidence"]
    features = "demo"             # feature extractor of fd / kid

    [sampler]
    steps = 16

    [[rules]]                     # a product over the listed values
    rule = "SEG"
    scale = 1.0
    sigma = [0.5, 1, 2, 5, inf]

A list value is a sweep axis; a list of layer names is written as a nested list
(``layers = [["blocks.0.attn", "blocks.1.attn"]]``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import rules as _rules

__all__ = [
    "METRICS",
    "RULES",
    "RuleGrid",
    "SamplerSettings",
    "Setting",
    "Study",
    "StudyError",
    "compose",
    "load_study",
]


class StudyError(ValueError):
    """A study definition or output folder is invalid; the message names the key."""


class MetricWeightsError(StudyError):
    """A metric's network weights are not available offline (the message says how to get them)."""


#: Rule names accepted in ``rule = ...`` and the classes they build.
RULES: dict[str, Any] = {
    "CFG": _rules.CFG,
    "SEG": _rules.SEG,
    "PAG": _rules.PAG,
    "APG": _rules.APG,
    "Rescale": _rules.Rescale,
    "CFGZeroStar": _rules.CFGZeroStar,
    "TCFG": _rules.TCFG,
    "FDG": _rules.FDG,
    "MAMBOG": _rules.MAMBOG,
    "SLG": _rules.SLG,
    "TPG": _rules.TPG,
    "SAG": _rules.SAG,
    "Autoguidance": _rules.Autoguidance,
}
#: ``weak`` of ``rule = "Autoguidance"`` when not given: the model factory's shipped weak model.
DEFAULT_WEAK = "shipped"
#: Per-rule parameters a study may set (schedules stay at their defaults).
_SCHEDULES = {"schedule", "cfg_schedule"}

#: Metric names and what they measure (see :mod:`smoothguide.study.metrics`), in the
#: order of the report's columns.
METRICS: dict[str, str] = {
    "fd": "Fréchet distance of the features to the reference set",
    "kid": "kernel inception distance (unbiased MMD², cubic kernel) to the reference set",
    "clip_score": "CLIP score 100·max(cos, 0) of each sample with its prompt (local CLIP)",
    "rms": "RMS pixel difference to the unguided sample of the same seed",
    "ssim": "SSIM to the unguided sample of the same seed",
    "lpips": "LPIPS distance to the unguided sample of the same seed (local weights)",
    "ink": "mean intensity in [0, 1]",
    "saturation": "mean HSV saturation (RGB samples)",
    "confidence": "mean top-class probability of the feature classifier",
    "accuracy": "fraction classified as the label sampled (class-conditional)",
}

_TOP_KEYS = (
    "name",
    "seed",
    "model",
    "model_options",
    "labels",
    "prompts",
    "seeds",
    "unit_size",
    "metrics",
    "features",
    "feature_options",
    "metric_options",
    "kid_subset",
    "sampler",
    "rules",
)
_SAMPLERS = ("euler",)


def _num(value: Any, key: str) -> Any:
    """TOML/JSON numbers; the strings ``"inf"`` / ``"∞"`` mean ``math.inf``."""
    if isinstance(value, str) and value.strip().lower() in ("inf", "∞", "+inf", "infinity"):
        return math.inf
    return value


def _accepted(rule: str) -> list[str]:
    names = {f.name for f in dataclasses.fields(RULES[rule])} - _SCHEDULES
    if rule == "Autoguidance":  # the weak model is named (``weak``), not passed as an object
        names = (names - {"model"}) | {"weak"}
    return sorted(names)


def _params(rule: str, params: Mapping[str, Any], key: str) -> dict[str, Any]:
    accepted = _accepted(rule)
    out = {}
    for name, value in params.items():
        if name not in accepted:
            raise StudyError(
                f"{key}.{name}: unknown parameter of {rule}; accepted: {', '.join(accepted)}"
            )
        if name == "weak":
            for v in _axis(value):
                if not isinstance(v, str) or not v:
                    raise StudyError(
                        f"{key}.weak: must be {DEFAULT_WEAK!r} (the model's shipped weak "
                        f"model) or the path of a weak model's folder, got {v!r}"
                    )
        out[name] = value
    return out


class _UnresolvedWeak:
    """Stand-in weak model of a setting built without the model factory (validation, ``repr``)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise StudyError(
            f"weak model {self.name!r} was not resolved: build the setting with "
            "Setting.build(weak=model.weak_model) of the study's model"
        )

    def __repr__(self) -> str:
        return f"<weak model {self.name!r}>"


def _axis(value: Any) -> list[Any]:
    """A list is a sweep axis, anything else a single value."""
    if isinstance(value, list | tuple) and not isinstance(value, str):
        return [tuple(v) if isinstance(v, list) else v for v in value]
    return [value]


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "∞" if math.isinf(v) else f"{v:g}"
    if isinstance(v, tuple):
        return "(" + ",".join(_fmt(x) for x in v) + ")"
    return str(v)


@dataclass(frozen=True)
class Setting:
    """One point of the grid: a concrete rule (``None``: no guidance).

    Attributes
    ----------
    family
        Curve of the Pareto plot it belongs to (``"none"`` for the baseline).
    name
        Readable label, e.g. ``"SEG scale=1 sigma=∞"``.
    spec
        Canonical JSON-able description (rule name, parameters, terms).

    Examples
    --------
    >>> from smoothguide.rules import PAG
    >>> s = RuleGrid("PAG", scale=2.0).settings()[0]
    >>> s.family, s.name, s.build() == PAG(2.0)
    ('PAG', 'PAG scale=2', True)
    """

    family: str
    name: str
    spec: Mapping[str, Any]

    def build(self, weak: Callable[[str], Any] | None = None) -> Any:
        """The rule object of this setting (``None`` for the unguided baseline).

        Parameters
        ----------
        weak
            Resolves an Autoguidance ``weak`` name to the weak denoiser (the study
            model's ``weak_model``); ``None`` puts a stand-in there that raises when called.
        """
        return _build(self.spec, weak)


def _build(spec: Mapping[str, Any], weak: Callable[[str], Any] | None = None) -> Any:
    if spec["rule"] == "none":
        return None
    if spec["rule"] == "Compose":
        return _rules.Compose(*(_build(t, weak) for t in spec["terms"]))
    params = {k: (_num(v, k) if k in ("sigma", "scale") else v) for k, v in spec["params"].items()}
    if spec["rule"] == "Autoguidance":
        name = params.pop("weak", DEFAULT_WEAK)
        params["model"] = _UnresolvedWeak(name) if weak is None else weak(name)
    if isinstance(params.get("sigma"), list):
        params["sigma"] = tuple(_num(x, "sigma") for x in params["sigma"])
    for key in ("layers", "heads", "scales"):  # JSON lists back to the tuples the rules take
        if isinstance(params.get(key), list):
            params[key] = tuple(params[key])
    return RULES[spec["rule"]](**params)


BASELINE = Setting("none", "none", {"rule": "none"})


@dataclass(frozen=True)
class RuleGrid:
    """A product over named rule parameters, e.g. ``RuleGrid("SEG", scale=1, sigma=[1, inf])``.

    Parameters
    ----------
    rule
        ``"CFG"``, ``"SEG"``, ``"PAG"``, ``"APG"``, ``"Rescale"`` or ``"Compose"``.
    family
        Curve label in the Pareto plot (default: the rule name, ``"CFG+SEG"`` for a
        composition of CFG and SEG).
    terms
        For ``"Compose"``: the grids of the terms; the grid is the product of theirs.
    **params
        Rule parameters; a list is a sweep axis.

    Examples
    --------
    >>> g = RuleGrid("SEG", scale=1.0, sigma=[2.0, math.inf])
    >>> [s.name for s in g.settings()]
    ['SEG scale=1 sigma=2', 'SEG scale=1 sigma=∞']
    >>> [s.name for s in compose(RuleGrid("CFG", scale=2.0), g).settings()][1]
    'CFG scale=2 + SEG scale=1 sigma=∞'
    """

    rule: str
    family: str | None = None
    terms: tuple[RuleGrid, ...] = ()
    params: Mapping[str, Any] = field(default_factory=dict)

    def __init__(
        self,
        rule: str,
        *,
        family: str | None = None,
        terms: Sequence[RuleGrid] = (),
        **params: Any,
    ) -> None:
        object.__setattr__(self, "rule", rule)
        object.__setattr__(self, "family", family)
        object.__setattr__(self, "terms", tuple(terms))
        object.__setattr__(self, "params", dict(params))

    def family_name(self) -> str:
        """The curve label: ``family`` or the rule names joined by ``+``."""
        if self.family:
            return self.family
        if self.rule == "Compose":
            return "+".join(t.family_name() for t in self.terms)
        return self.rule

    def settings(self, key: str = "rules[0]") -> list[Setting]:
        """Every setting of the product, validated (errors name ``key``)."""
        if self.rule == "Compose":
            if self.params:
                raise StudyError(
                    f"{key}: Compose takes terms = [...], not parameters {sorted(self.params)}"
                )
            if not self.terms:
                raise StudyError(f"{key}.terms: Compose needs at least one term")
            per_term = [t.settings(f"{key}.terms[{i}]") for i, t in enumerate(self.terms)]
            out = []
            for combo in itertools.product(*per_term):
                spec = {"rule": "Compose", "terms": [dict(s.spec) for s in combo]}
                name = " + ".join(s.name for s in combo)
                out.append(Setting(self.family_name(), name, spec))
            return out
        if self.rule not in RULES:
            raise StudyError(
                f"{key}.rule: unknown rule {self.rule!r}; accepted: "
                f"{', '.join([*RULES, 'Compose'])}"
            )
        if self.terms:
            raise StudyError(f"{key}.terms: only Compose takes terms")
        params = _params(self.rule, self.params, key)
        names = sorted(params)
        out = []
        for values in itertools.product(*(_axis(params[n]) for n in names)):
            concrete = dict(zip(names, values, strict=True))
            for n, v in concrete.items():
                if n in ("sigma", "scale", "cfg_scale"):
                    vals = v if isinstance(v, tuple) else (v,)
                    for x in vals:
                        x = _num(x, n)
                        if isinstance(x, bool) or not isinstance(x, int | float) or not x >= 0:
                            raise StudyError(
                                f"{key}.{n}: must be a number >= 0"
                                + (" or inf" if n == "sigma" else "")
                                + f", got {x!r}"
                            )
            spec = {"rule": self.rule, "params": _jsonable(concrete)}
            try:
                _build(spec)
            except (TypeError, ValueError) as exc:
                raise StudyError(f"{key}: {self.rule}({concrete}) is invalid: {exc}") from None
            label = " ".join(f"{n}={_fmt(_num(concrete[n], n))}" for n in names)
            out.append(Setting(self.family_name(), f"{self.rule} {label}".strip(), spec))
        return out


def compose(*terms: RuleGrid, family: str | None = None) -> RuleGrid:
    """A :class:`RuleGrid` of ``Compose(*terms)``: the product of the terms' grids.

    Parameters
    ----------
    *terms
        Grids of the terms, in the order they are applied.
    family
        Curve label (default: the terms' families joined by ``+``).

    Returns
    -------
    RuleGrid

    Examples
    --------
    >>> g = compose(RuleGrid("CFG", scale=[2.0, 3.0]), RuleGrid("SEG", sigma=math.inf))
    >>> len(g.settings()), g.family_name()
    (2, 'CFG+SEG')
    """
    return RuleGrid("Compose", family=family, terms=terms)


@dataclass(frozen=True)
class SamplerSettings:
    """Sampler of every unit.

    Parameters
    ----------
    steps
        Denoiser calls per sample.
    name
        ``"euler"`` (:func:`smoothguide.sampling.sample_euler`).
    threads
        Torch CPU threads per process (``None``: leave torch's default).

    Examples
    --------
    >>> SamplerSettings(steps=0).check()
    Traceback (most recent call last):
    ...
    smoothguide.study.definition.StudyError: sampler.steps: must be an int >= 1, got 0
    """

    steps: int = 16
    name: str = "euler"
    threads: int | None = None

    def check(self) -> None:
        """Raise :class:`StudyError` for an unknown sampler or steps < 1."""
        if self.name not in _SAMPLERS:
            raise StudyError(f"sampler.name: unknown sampler {self.name!r}; accepted: euler")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise StudyError(f"sampler.steps: must be an int >= 1, got {self.steps!r}")
        t = self.threads
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise StudyError(f"sampler.threads: must be an int >= 1, got {t!r}")


@dataclass(frozen=True)
class Study:
    """A guidance study (see the module docstring for the TOML form).

    Parameters
    ----------
    name
        Name of the study.
    rules
        Grids of rule settings; the unguided baseline is always added first.
    labels
        Class labels (``"null"``: unconditional); ignored when ``prompts`` is set.
    prompts
        Prompts (a list) or the path of a prompts file (one per line; blank lines
        and lines starting with ``#`` are skipped).
    seeds
        Seed indices per label / prompt.
    seed
        The study seed.
    model, model_options
        Model factory (see :mod:`smoothguide.study.models`) and its options.
    sampler
        :class:`SamplerSettings`.
    unit_size
        Samples per work unit.
    metrics
        Names from :data:`METRICS`.
    features, feature_options
        Feature extractor of ``fd`` / ``kid`` (see :mod:`smoothguide.study.metrics`).
    metric_options
        A table per metric with a network of its own: ``{"clip_score": {"model":
        DIR}, "lpips": {"net": ..., "backbone": ..., "linear": ...}}``.
    kid_subset
        Size of the deterministic KID subset per setting.
    base_dir
        Directory that relative paths (the prompts file) are resolved against.

    Examples
    --------
    >>> s = Study("t", rules=(RuleGrid("PAG", scale=[0.5, 1.0]),), labels=(3,), seeds=2)
    >>> [x.name for x in s.settings()]
    ['none', 'PAG scale=0.5', 'PAG scale=1']
    >>> len(s.definition_hash())
    64
    """

    name: str
    rules: tuple[RuleGrid, ...]
    labels: tuple[int | str, ...] = ("null",)
    prompts: str | tuple[str, ...] | None = None
    seeds: int = 4
    seed: int = 0
    model: str = "demo"
    model_options: Mapping[str, Any] = field(default_factory=dict)
    sampler: SamplerSettings = field(default_factory=SamplerSettings)
    unit_size: int = 8
    metrics: tuple[str, ...] = ("fd", "kid", "rms", "ssim", "ink", "confidence")
    features: str = "demo"
    feature_options: Mapping[str, Any] = field(default_factory=dict)
    metric_options: Mapping[str, Any] = field(default_factory=dict)
    kid_subset: int = 1000
    base_dir: str = field(default=".", compare=False)

    def items(self) -> list[int | str]:
        """The labels, or the prompts read from the prompts file."""
        if self.prompts is None:
            return list(self.labels)
        if isinstance(self.prompts, str):
            path = os.path.join(self.base_dir, self.prompts)
            if not os.path.isfile(path):
                raise StudyError(f"prompts: no prompts file at {path!r} (one prompt per line)")
            with open(path, encoding="utf-8") as fh:
                lines = [ln.strip() for ln in fh]
            out = [ln for ln in lines if ln and not ln.startswith("#")]
            if not out:
                raise StudyError(f"prompts: the prompts file {path!r} is empty")
            return list(out)
        return list(self.prompts)

    def settings(self) -> list[Setting]:
        """The baseline, then every grid's settings (duplicates of earlier ones dropped)."""
        out = [BASELINE]
        seen = {json.dumps(BASELINE.spec, sort_keys=True)}
        for i, g in enumerate(self.rules):
            if not isinstance(g, RuleGrid):
                raise StudyError(f"rules[{i}]: must be a RuleGrid, got {type(g).__name__}")
            for s in g.settings(f"rules[{i}]"):
                k = json.dumps(s.spec, sort_keys=True)
                if k not in seen:
                    seen.add(k)
                    out.append(s)
        return out

    def validate(self) -> None:
        """Check the whole definition without loading any model; raise :class:`StudyError`."""
        from .metrics import check_feature_names, check_metric_options
        from .models import check_model, check_weak_models

        if not isinstance(self.name, str) or not self.name:
            raise StudyError(f"name: must be a non-empty string, got {self.name!r}")
        for key in ("seeds", "unit_size", "kid_subset"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise StudyError(f"{key}: must be an int >= 1, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise StudyError(f"seed: must be an int >= 0, got {self.seed!r}")
        if not self.rules:
            raise StudyError("rules: at least one [[rules]] grid is needed")
        for m in self.metrics:
            if m not in METRICS:
                raise StudyError(f"metrics: unknown metric {m!r}; accepted: {', '.join(METRICS)}")
        if not self.metrics:
            raise StudyError(f"metrics: at least one is needed; accepted: {', '.join(METRICS)}")
        self.sampler.check()
        self.settings()
        items = self.items()
        if not items:
            raise StudyError("labels: at least one label (or a prompts file) is needed")
        if len(set(map(str, items))) != len(items):
            raise StudyError("labels: labels / prompts must be distinct")
        check_model(self.model, items, self.prompts is not None)
        check_weak_models(self.model, list(self._weak_names()))
        check_feature_names(self.features, self.metrics)
        check_metric_options(
            self.metrics, self.metric_options, prompts=self.prompts is not None, items=items
        )

    def _weak_names(self) -> Iterator[tuple[str, str]]:
        """``(key, weak name)`` of every Autoguidance setting, e.g. ``("rules[3].weak", ...)``."""

        def walk(spec: Mapping[str, Any], key: str) -> Iterator[tuple[str, str]]:
            if spec["rule"] == "Compose":
                for j, t in enumerate(spec["terms"]):
                    yield from walk(t, f"{key}.terms[{j}]")
            elif spec["rule"] == "Autoguidance":
                yield f"{key}.weak", spec["params"].get("weak", DEFAULT_WEAK)

        for i, g in enumerate(self.rules):
            for s in g.settings(f"rules[{i}]"):
                yield from walk(s.spec, f"rules[{i}]")

    def to_dict(self) -> dict[str, Any]:
        """Canonical JSON-able definition (prompts inlined, so the hash covers their text).

        ``metric_options`` appears only when set, so the hashes of studies written
        before it existed do not change.
        """
        extra = {"metric_options": dict(self.metric_options)} if self.metric_options else {}
        return _jsonable(
            {
                **extra,
                "name": self.name,
                "seed": self.seed,
                "model": self.model,
                "model_options": dict(self.model_options),
                "items": self.items(),
                "conditioning": "prompts" if self.prompts is not None else "labels",
                "seeds": self.seeds,
                "unit_size": self.unit_size,
                "metrics": list(self.metrics),
                "features": self.features,
                "feature_options": dict(self.feature_options),
                "kid_subset": self.kid_subset,
                "sampler": {"name": self.sampler.name, "steps": self.sampler.steps},
                "settings": [
                    {"family": s.family, "name": s.name, "spec": s.spec} for s in self.settings()
                ],
            }
        )

    def definition_hash(self) -> str:
        """SHA-256 of the canonical JSON of :meth:`to_dict` (sorted keys, no spaces)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _grid(table: Mapping[str, Any], key: str) -> RuleGrid:
    if not isinstance(table, Mapping):
        raise StudyError(f"{key}: must be a table with rule = ..., got {table!r}")
    t = dict(table)
    if "rule" not in t:
        raise StudyError(f"{key}.rule: missing; accepted: {', '.join([*RULES, 'Compose'])}")
    rule = t.pop("rule")
    family = t.pop("family", None)
    terms = t.pop("terms", [])
    if not isinstance(terms, list):
        raise StudyError(f"{key}.terms: must be a list of tables")
    sub = tuple(_grid(x, f"{key}.terms[{i}]") for i, x in enumerate(terms))
    return RuleGrid(rule, family=family, terms=sub, **t)


def _load_toml(path: str) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as fh:
        try:
            return tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise StudyError(f"{path}: not valid TOML: {exc}") from None


def study_from_dict(data: Mapping[str, Any], *, base_dir: str = ".") -> Study:
    """A :class:`Study` from the parsed TOML table (validated)."""
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise StudyError(f"{unknown[0]}: unknown key; accepted: {', '.join(_TOP_KEYS)}")
    d = dict(data)
    rules = d.pop("rules", [])
    if not isinstance(rules, list):
        raise StudyError("rules: must be an array of tables ([[rules]])")
    grids = tuple(_grid(r, f"rules[{i}]") for i, r in enumerate(rules))
    sampler = d.pop("sampler", {})
    if not isinstance(sampler, Mapping):
        raise StudyError("sampler: must be a table ([sampler])")
    bad = sorted(set(sampler) - {"steps", "name", "threads"})
    if bad:
        raise StudyError(f"sampler.{bad[0]}: unknown key; accepted: name, steps, threads")
    for key in ("labels", "metrics"):
        if key in d:
            if not isinstance(d[key], list):
                raise StudyError(f"{key}: must be a list, got {d[key]!r}")
            d[key] = tuple(d[key])
    if isinstance(d.get("prompts"), list):
        d["prompts"] = tuple(d["prompts"])
    if "name" not in d:
        raise StudyError("name: missing; every study needs a name")
    study = Study(rules=grids, sampler=SamplerSettings(**sampler), base_dir=base_dir, **d)
    study.validate()
    return study


def load_study(path: str | os.PathLike[str]) -> Study:
    """Load and validate a study TOML file (relative paths resolve against its folder).

    Parameters
    ----------
    path
        The ``.toml`` file.

    Returns
    -------
    Study
        The validated study.

    Raises
    ------
    StudyError
        Naming the offending key and the accepted values.

    Examples
    --------
    >>> load_study("missing.toml")
    Traceback (most recent call last):
    ...
    smoothguide.study.definition.StudyError: study file 'missing.toml' does not exist
    """
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise StudyError(f"study file {p!r} does not exist")
    return study_from_dict(_load_toml(p), base_dir=os.path.dirname(os.path.abspath(p)))
