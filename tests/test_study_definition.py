"""Study definitions: grids, TOML loading, schema errors before sampling, definition hash."""

from __future__ import annotations

import math
import os
import textwrap

import pytest

from smoothguide.rules import CFG, PAG, SEG, Compose
from smoothguide.study import RuleGrid, Study, StudyError, compose, load_study
from smoothguide.study.cli import main as study_main

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples", "studies")

GOOD = """
name = "t"
seed = 1
labels = ["null", 3]
seeds = 2
unit_size = 2
metrics = ["rms", "ink"]

[sampler]
steps = 2

[[rules]]
rule = "SEG"
scale = 1.0
sigma = [0.5, 1, 2, 5, inf]

[[rules]]
rule = "PAG"
scale = [0.25, 0.5]

[[rules]]
rule = "Compose"
terms = [{ rule = "CFG", scale = [2.0, 3.0] }, { rule = "SEG", scale = 1.0, sigma = "inf" }]
"""


def _write(tmp_path, text, name="s.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(p)


def test_grid_is_the_product_and_builds_the_rules(tmp_path):
    s = load_study(_write(tmp_path, GOOD))
    settings = s.settings()
    # baseline + 5 SEG sigmas + 2 PAG scales + 2 x 1 compositions
    assert len(settings) == 1 + 5 + 2 + 2
    assert settings[0].build() is None
    seg = [x.build() for x in settings if x.family == "SEG"]
    assert seg == [SEG(1.0, sigma=v) for v in (0.5, 1.0, 2.0, 5.0, math.inf)]
    assert [x.build() for x in settings if x.family == "PAG"] == [PAG(0.25), PAG(0.5)]
    comp = [x.build() for x in settings if x.family == "CFG+SEG"]
    assert comp == [Compose(CFG(w), SEG(1.0, sigma=math.inf)) for w in (2.0, 3.0)]


def test_python_and_toml_definitions_agree(tmp_path):
    s = load_study(_write(tmp_path, GOOD))
    py = Study(
        "t",
        rules=(
            RuleGrid("SEG", scale=1.0, sigma=[0.5, 1, 2, 5, math.inf]),
            RuleGrid("PAG", scale=[0.25, 0.5]),
            compose(RuleGrid("CFG", scale=[2.0, 3.0]), RuleGrid("SEG", scale=1.0, sigma="inf")),
        ),
        labels=("null", 3),
        seeds=2,
        seed=1,
        unit_size=2,
        metrics=("rms", "ink"),
        sampler=s.sampler,
    )
    py.validate()
    assert py.definition_hash() == s.definition_hash()


def test_hash_ignores_key_order_and_changes_with_content(tmp_path):
    a = load_study(_write(tmp_path, GOOD, "a.toml"))
    reordered = GOOD.replace('seed = 1\nlabels = ["null", 3]', 'labels = ["null", 3]\nseed = 1')
    assert reordered != GOOD
    b = load_study(_write(tmp_path, reordered, "b.toml"))
    assert a.definition_hash() == b.definition_hash()
    c = load_study(_write(tmp_path, GOOD.replace("steps = 2", "steps = 3"), "c.toml"))
    assert c.definition_hash() != a.definition_hash()


def test_prompts_file_contents_are_hashed(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\na dog\n", encoding="utf-8")
    text = GOOD.replace('labels = ["null", 3]', 'prompts = "p.txt"').replace(
        'name = "t"', 'name = "t"\nmodel = "sdxl"'
    )
    s = load_study(_write(tmp_path, text))
    assert s.items() == ["a cat", "a dog"]
    h = s.definition_hash()
    (tmp_path / "p.txt").write_text("a cat\na bird\n", encoding="utf-8")
    assert load_study(str(tmp_path / "s.toml")).definition_hash() != h


@pytest.mark.parametrize(
    "old, new, key, accepted",
    [
        ("sigma = [0.5, 1, 2, 5, inf]", "sigmaa = [1]", "rules[0].sigmaa", "sigma"),
        ("sigma = [0.5, 1, 2, 5, inf]", "sigma = [1, -0.5]", "rules[0].sigma", ">= 0"),
        ('metrics = ["rms", "ink"]', 'metrics = ["rms", "lpips2"]', "metrics", "ssim"),
        ('labels = ["null", 3]', 'prompts = "missing.txt"', "prompts", "missing.txt"),
        ('labels = ["null", 3]', 'labels = ["null", 12]', "labels", "0..9"),
        ('rule = "PAG"', 'rule = "PAGE"', "rules[1].rule", "SEG"),
        ("steps = 2", "steps = 0", "sampler.steps", ">= 1"),
        ("seeds = 2", "seedz = 2", "seedz", "seeds"),
        (
            '{ rule = "CFG", scale = [2.0, 3.0] }',
            '{ rule = "CFG", sigma = 1 }',
            "rules[2].terms[0].sigma",
            "scale",
        ),
    ],
)
def test_bad_study_fails_before_sampling_naming_the_key(tmp_path, capsys, old, new, key, accepted):
    assert old in GOOD
    path = _write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(StudyError) as err:
        load_study(path)
    msg = str(err.value)
    assert msg.startswith(key + ":") or f"{key}:" in msg, msg
    assert accepted in msg
    out = tmp_path / "out"
    assert study_main(["run", path, "--out", str(out), "--no-progress"]) == 2
    assert key in capsys.readouterr().err
    assert not out.exists()  # nothing was created, let alone sampled


@pytest.mark.parametrize(
    "features, metrics, key",
    [
        ("inception", '["fd", "rms"]', "feature_options.weights"),
        ("clip", '["kid"]', "feature_options.model"),
    ],
)
def test_missing_metric_weights_fail_at_start_naming_the_metric(
    tmp_path, capsys, features, metrics, key
):
    text = GOOD.replace('metrics = ["rms", "ink"]', f'metrics = {metrics}\nfeatures = "{features}"')
    path = _write(tmp_path, text)
    out = tmp_path / "out"
    assert study_main(["run", path, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    first = metrics.split('"')[1]
    assert f"metrics {first} " in err  # names the metric (fd / kid)
    assert key in err
    assert not out.exists()


def test_shipped_examples_validate():
    s = load_study(os.path.join(EXAMPLES, "demo_pareto.toml"))
    fams = {x.family for x in s.settings()}
    assert {"none", "SEG", "PAG"} <= fams
    paper = load_study(os.path.join(EXAMPLES, "sdxl_paper.toml"))
    assert paper.model == "sdxl"
    sig = sorted(x.build().sigma for x in paper.settings() if x.family == "SEG")
    assert sig == [1.0, 2.0, 5.0, 10.0, math.inf]
    uncond = load_study(os.path.join(EXAMPLES, "sdxl_paper_unconditional.toml"))
    assert uncond.items() == ["null"]


def test_library_rules_and_tuple_parameters_round_trip_through_toml(tmp_path):
    # the study registry builds every library rule from TOML exactly as the class itself
    from smoothguide.rules import FDG, MAMBOG, SAG, SLG, TCFG, TPG, CFGZeroStar

    path = tmp_path / "s.toml"
    path.write_text(
        textwrap.dedent(
            """
            name = "lib"
            model = "demo"
            labels = [1]
            seeds = 1
            metrics = ["rms"]
            [[rules]]
            rule = "CFGZeroStar"
            scale = 2.0
            [[rules]]
            rule = "TCFG"
            scale = 2.0
            [[rules]]
            rule = "FDG"
            scales = [[3.0, 1.5]]
            [[rules]]
            rule = "MAMBOG"
            scale = 2.0
            [[rules]]
            rule = "SLG"
            layers = "blocks.2.attn"
            [[rules]]
            rule = "TPG"
            scale = 0.5
            [[rules]]
            rule = "SAG"
            layers = "blocks.2.attn"
            [[rules]]
            rule = "SEG"
            sigma = "inf"
            heads = [[0, 2]]
            """
        )
    )
    built = [s.build() for s in load_study(path).settings()[1:]]
    assert built == [
        CFGZeroStar(2.0),
        TCFG(2.0),
        FDG(scales=(3.0, 1.5)),
        MAMBOG(2.0),
        SLG(layers="blocks.2.attn"),
        TPG(0.5),
        SAG(layers="blocks.2.attn"),
        SEG(sigma=math.inf, heads=(0, 2)),
    ]


def test_shipped_demo_comparison_studies_validate():
    lib = load_study(os.path.join(EXAMPLES, "demo_rule_library.toml"))
    fams = {x.family for x in lib.settings()}
    assert {"CFG", "CFGZeroStar", "TCFG", "FDG", "APG", "MAMBOG"} <= fams
    assert "null" not in lib.items()  # the library rules are compared class-conditionally
    pert = load_study(os.path.join(EXAMPLES, "demo_perturbations.toml"))
    fams = {x.family for x in pert.settings()}
    assert {"SEG", "SEG one head", "PAG", "SLG", "TPG", "SAG", "Autoguidance"} <= fams
    assert pert.items() == ["null"]
    ag = load_study(os.path.join(EXAMPLES, "demo_autoguidance.toml"))
    scales = {
        f: sorted(x.build().scale for x in ag.settings() if x.family == f)
        for f in ("CFG", "Autoguidance")
    }
    assert scales["CFG"] == scales["Autoguidance"]  # compared at the same w, as in EDM2
    assert ag.items() == lib.items()
