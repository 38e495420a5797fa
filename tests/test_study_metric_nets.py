"""CLIP score, LPIPS and the CLIP feature extractor on tiny random local weights.

References: CLIPModel.forward (its own normalised embeddings, a code path apart from
get_*_features), torchmetrics' clip_score, a float64 functional LPIPS written here
from Zhang et al. 2018 (Eq. 1), and torchmetrics' LPIPS network where torchvision is
installed. Every network is built from a config with random weights; nothing is
downloaded.
"""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from smoothguide.study import RuleGrid, SamplerSettings, Store, Study, StudyError, load_study
from smoothguide.study.clip import ClipScorer
from smoothguide.study.definition import MetricWeightsError
from smoothguide.study.dist import Dist
from smoothguide.study.lpips import lpips_backbone, lpips_network
from smoothguide.study.metrics import (
    check_feature_weights,
    check_metric_weights,
    load_extractor,
)
from smoothguide.study.runner import reduce_metrics, run_study
from tiny_clip import save_random_lpips, save_tiny_clip

PROMPTS = ["a cat", "a photo of a dog", "zebra", "the quick brown fox", "red", "blue sky"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return str(save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip"))


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _images(n, c=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, size, size, generator=g) * 2 - 1


def _uint8(x):
    u = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return u.expand(-1, 3, -1, -1) if u.shape[1] == 1 else u


def _reference_clip_score(folder, images, prompts):
    """100 max(cos, 0) from CLIPModel.forward's normalised image / text embeddings."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    proc = CLIPProcessor.from_pretrained(folder, local_files_only=True)
    inputs = proc(text=prompts, images=list(_uint8(images)), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cos = (out.image_embeds.double() * out.text_embeds.double()).sum(-1)
    return 100 * cos.clamp_min(0), 100 * cos


# --- CLIP score -----------------------------------------------------------------------------


def test_clip_score_matches_clip_forward_and_torchmetrics(clip_dir):
    x = _images(len(PROMPTS))
    got = ClipScorer(clip_dir, "cpu")(x, PROMPTS).numpy()
    want, raw = _reference_clip_score(clip_dir, x, PROMPTS)
    assert (raw < 0).any()  # the data exercises the clamp at 0 ...
    assert (raw > 0).any()  # ... and the positive side
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-4)

    # torchmetrics' clip_score (its own processor call and normalisation) on the samples
    # whose cosine is positive, where its clamp of the mean equals the mean of ours
    from torchmetrics.functional.multimodal import clip_score
    from transformers import CLIPModel, CLIPProcessor

    class V5Compatible(torch.nn.Module):  # torchmetrics 1.9 expects tensors, not outputs
        def __init__(self, m):
            super().__init__()
            self.m, self.config = m, m.config

        def get_image_features(self, *a, **k):
            out = self.m.get_image_features(*a, **k)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

        def get_text_features(self, *a, **k):
            out = self.m.get_text_features(*a, **k)
            return out if isinstance(out, torch.Tensor) else out.pooler_output

    def load():
        m = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
        return V5Compatible(m), CLIPProcessor.from_pretrained(clip_dir, local_files_only=True)

    pos = [i for i in range(len(PROMPTS)) if raw[i] > 0]
    with torch.no_grad():
        tm = clip_score(list(_uint8(x[pos])), [PROMPTS[i] for i in pos], load)
    assert float(tm) == pytest.approx(float(np.mean(got[pos])), rel=1e-5)


def test_clip_score_sums_of_two_halves_merge_to_the_whole(clip_dir, tmp_path):
    """A text-conditional study: per-sample rows against the reference, rank sums add up."""
    study = Study(
        "clip",
        rules=(RuleGrid("CFG", scale=[1.0, 3.0]),),
        prompts=tuple(PROMPTS[:3]),
        seeds=2,
        unit_size=2,
        model="tiny_clip:prompt_factory",
        metrics=("clip_score", "rms"),
        metric_options={"clip_score": {"model": clip_dir}},
        sampler=SamplerSettings(steps=1),
    )
    out = str(tmp_path / "out")
    m = run_study(study, out, progress=False, echo=False)
    assert m is not None
    store = Store(out)
    items = study.items()
    per_setting: dict[int, list[float]] = {}
    for rec in store.records():
        body = store.read_rows(rec["unit"])
        t = store.read_tensors(rec["unit"], ("samples", "item"))
        prompts = [items[i] for i in t["item"].tolist()]
        want, _ = _reference_clip_score(clip_dir, t["samples"], prompts)
        got = [r["clip_score"] for r in body["rows"]]
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-4)
        per_setting.setdefault(body["setting"], []).extend(got)
    for row in m["settings"]:
        assert row["clip_score"] == pytest.approx(np.mean(per_setting[row["setting"]]), rel=1e-12)
    # CFG scale 1 is the unguided sample itself
    assert m["settings"][1]["clip_score"] == m["settings"][0]["clip_score"]

    class Capture(Dist):  # one rank of two; the all-reduce is the caller's sum
        def all_reduce_sum(self, t):
            self.seen = t.clone()
            return t

    whole, halves = Capture(), [Capture(rank=r, world=2) for r in (0, 1)]
    for d in (whole, *halves):
        reduce_metrics(study, store, d)
    torch.testing.assert_close(halves[0].seen + halves[1].seen, whole.seen, rtol=1e-12, atol=0)
    assert halves[0].seen[:, :, 1].sum() > 0  # both ranks hold samples
    assert halves[1].seen[:, :, 1].sum() > 0


def test_clip_score_errors_name_the_metric_before_sampling(clip_dir, tmp_path):
    with pytest.raises(MetricWeightsError, match=r"clip_score.*no such folder.*save_pretrained"):
        check_metric_weights(["clip_score"], {"clip_score": {"model": str(tmp_path / "no")}})
    with pytest.raises(MetricWeightsError, match=r"metric_options.clip_score\] model = None"):
        check_metric_weights(["clip_score"], {})
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors", "processor_config.json"):
        with open(os.path.join(clip_dir, f), "rb") as a, open(no_tok / f, "wb") as b:
            b.write(a.read())
    with pytest.raises(MetricWeightsError, match="clip_score.*no tokenizer"):
        check_metric_weights(["clip_score"], {"clip_score": {"model": str(no_tok)}})
    (no_tok / "model.safetensors").write_bytes(b"not safetensors")
    (no_tok / "tokenizer.json").write_text("{}")
    with pytest.raises(MetricWeightsError, match="clip_score.*cannot be loaded offline"):
        ClipScorer(str(no_tok), "cpu")

    study = Study(
        "c",
        rules=(RuleGrid("CFG", scale=2.0),),
        prompts=("a cat",),
        seeds=1,
        model="tiny_clip:prompt_factory",
        metrics=("clip_score",),
        metric_options={"clip_score": {"model": str(tmp_path / "absent")}},
    )
    with pytest.raises(MetricWeightsError, match="clip_score"):
        run_study(study, str(tmp_path / "out"), progress=False, echo=False)
    assert not os.path.exists(tmp_path / "out")  # refused before anything was written


def test_clip_score_on_a_study_without_prompts_is_a_schema_error(tmp_path):
    text = """
    name = "t"
    labels = ["null", 3]
    metrics = ["clip_score", "rms"]

    [metric_options.clip_score]
    model = "/models/clip"

    [[rules]]
    rule = "SEG"
    sigma = inf
    """
    p = tmp_path / "s.toml"
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    with pytest.raises(StudyError, match=r"metrics: clip_score .*prompts.*\['null', 3\]"):
        load_study(str(p))
    p.write_text(textwrap.dedent(text).replace("model = ", "modle = "), encoding="utf-8")
    with pytest.raises(StudyError, match=r"metric_options.clip_score.modle: unknown key"):
        load_study(str(p))
    bad = textwrap.dedent(text).replace("[metric_options.clip_score]", "[metric_options.fid]")
    p.write_text(bad, encoding="utf-8")
    with pytest.raises(StudyError, match=r"metric_options.fid: unknown metric"):
        load_study(str(p))


def test_metric_options_enter_the_hash_only_when_set():
    base = dict(rules=(RuleGrid("CFG", scale=2.0),), prompts=("a cat",), seeds=1)
    plain = Study("h", metrics=("rms",), **base)
    assert "metric_options" not in plain.to_dict()  # hashes of older studies are unchanged
    a = Study("h", metrics=("rms",), metric_options={"lpips": {"net": "alex"}}, **base)
    b = Study("h", metrics=("rms",), metric_options={"lpips": {"net": "vgg"}}, **base)
    assert len({plain.definition_hash(), a.definition_hash(), b.definition_hash()}) == 3


# --- the CLIP feature extractor (fd / kid) -------------------------------------------------


def test_clip_features_are_the_projected_image_embeddings(clip_dir):
    """transformers 5 returns a model output from get_image_features; the features stay (n, d)."""
    from transformers import CLIPImageProcessor, CLIPModel

    x = _images(5, c=1, size=20, seed=3)  # grey, not the processor's size: resized, cropped
    f, probs = load_extractor("clip", {"model": clip_dir}, "cpu")(x)
    assert probs is None
    assert f.dtype == torch.float32
    assert f.shape == (5, 8)
    model = CLIPModel.from_pretrained(clip_dir, local_files_only=True).eval()
    proc = CLIPImageProcessor.from_pretrained(clip_dir, local_files_only=True)
    pix = proc(images=list(_uint8(x)), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
    torch.testing.assert_close(f, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(MetricWeightsError, match="fd, kid with features = 'clip'.*no such"):
        check_feature_weights("clip", {"model": "/nowhere"}, ["fd", "kid", "rms"])


# --- LPIPS ----------------------------------------------------------------------------------


def _lpips_reference(x, y, backbone, linear, net, size):
    """Zhang et al. 2018, Eq. 1, in float64 with functional ops (no nn modules)."""
    sd = {k: v.double() for k, v in torch.load(backbone, weights_only=True).items()}
    lin = {k: v.double() for k, v in torch.load(linear, weights_only=True).items()}
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64)[None, :, None, None]
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64)[None, :, None, None]

    def conv(h, i, **kw):
        return F.relu(F.conv2d(h, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], **kw))

    def feats(z):
        z = z.double().expand(-1, 3, -1, -1)
        z = (z - shift) / scale
        if z.shape[-1] != size:
            z = F.interpolate(z, (size, size), mode="bilinear", align_corners=False)
        if net == "alex":
            h1 = conv(z, 0, stride=4, padding=2)
            h2 = conv(F.max_pool2d(h1, 3, 2), 3, padding=2)
            h3 = conv(F.max_pool2d(h2, 3, 2), 6, padding=1)
            h4 = conv(h3, 8, padding=1)
            return [h1, h2, h3, h4, conv(h4, 10, padding=1)]
        out, h, i = [], z, 0
        for block in (2, 2, 3, 3, 3):
            for _ in range(block):
                h = conv(h, i, padding=1)
                i += 2
            out.append(h)
            h, i = F.max_pool2d(h, 2, 2), i + 1
        return out

    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for layer, (a, b) in enumerate(zip(feats(x), feats(y), strict=True)):
        na = a / torch.sqrt(1e-8 + (a**2).sum(1, keepdim=True))
        nb = b / torch.sqrt(1e-8 + (b**2).sum(1, keepdim=True))
        w = lin[f"lin{layer}.model.1.weight"][0, :, 0, 0]
        total += (((na - nb) ** 2) * w[None, :, None, None]).sum(1).mean((1, 2))
    return total


@pytest.mark.parametrize(("net", "c", "side"), [("alex", 1, 16), ("alex", 3, 64), ("vgg", 3, 32)])
def test_lpips_matches_a_float64_functional_reference(tmp_path, net, c, side):
    backbone, linear = save_random_lpips(tmp_path, net, seed=1)
    x = _images(3, c=c, size=side, seed=4)
    y = (x + 0.4 * _images(3, c=c, size=side, seed=5)).clamp(-1, 1)
    d = lpips_network({"net": net, "backbone": str(backbone), "linear": str(linear)}, "cpu")
    got = d(x, y)
    want = _lpips_reference(x, y, backbone, linear, net, size=max(side, 64))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert got.min() > 0
    torch.testing.assert_close(d(y, x), got, rtol=1e-6, atol=0)
    assert d(x, x).abs().max() == 0


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_torchmetrics_network(tmp_path, monkeypatch, net):
    """torchmetrics' LPIPS (its scaling, normalisation, linear layers, resize) on the same weights.

    torchmetrics takes the backbone from torchvision (absent here: its PyPI wheel does
    not match the CPU torch); it is given the same layers, which the float64
    functional reference above checks on their own.
    """
    import torchmetrics.functional.image.lpips as tml

    monkeypatch.setattr(
        tml, "_get_tv_model_features", lambda name, pretrained=False: lpips_backbone(net)
    )
    backbone, linear = save_random_lpips(tmp_path, net, seed=2)
    ref = tml._LPIPS(pretrained=True, net=net, pnet_rand=True, model_path=str(linear), resize=64)
    sd = torch.load(backbone, weights_only=True)
    ref.net.load_state_dict({k: sd["features." + k.split(".", 1)[1]] for k in ref.net.state_dict()})
    x = _images(3, size=16, seed=6)
    y = (x + 0.3 * _images(3, size=16, seed=7)).clamp(-1, 1)
    ours = lpips_network({"net": net, "backbone": str(backbone), "linear": str(linear)}, "cpu")
    with torch.no_grad():
        want = ref(x, y).reshape(-1).double()
    torch.testing.assert_close(ours(x, y), want, rtol=1e-5, atol=1e-7)


def test_lpips_in_a_study_and_its_missing_weights(tmp_path, monkeypatch):
    backbone, linear = save_random_lpips(tmp_path / "w", "alex", seed=3)
    # the default places: torch.hub's checkpoint folder and torchmetrics' shipped layers
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    with pytest.raises(MetricWeightsError, match=r"lpips.*alexnet-owt-7be5be79.pth.*torch-home"):
        check_metric_weights(["lpips"], {})
    with pytest.raises(MetricWeightsError, match=r"lpips needs the LPIPS v0.1 linear.*alex.pth"):
        check_metric_weights(["lpips"], {"lpips": {"backbone": str(backbone), "linear": "/x"}})
    ckpt = tmp_path / "torch-home" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "alexnet-owt-7be5be79.pth").write_bytes(backbone.read_bytes())
    check_metric_weights(["lpips"], {})  # found where torchvision would have saved it

    study = Study(
        "lp",
        rules=(RuleGrid("CFG", scale=[1.0, 2.0]),),
        labels=(0,),
        seeds=3,
        unit_size=3,
        model="toy_study_model:factory",
        metrics=("lpips", "rms"),
        metric_options={"lpips": {"linear": str(linear)}},
        sampler=SamplerSettings(steps=1),
    )
    m = run_study(study, str(tmp_path / "out"), progress=False, echo=False)
    assert m is not None
    rows = {r["name"]: r for r in m["settings"]}
    assert rows["none"]["lpips"] == 0.0
    assert rows["CFG scale=1"]["lpips"] == 0.0  # CFG 1 is the unguided sample
    store = Store(str(tmp_path / "out"))
    guided = store.read_tensors("s002-c00000", ("samples",))["samples"]
    base = store.read_tensors("s000-c00000", ("samples",))["samples"]
    want = _lpips_reference(guided, base, backbone, linear, "alex", size=64)
    got = [r["lpips"] for r in store.read_rows("s002-c00000")["rows"]]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4)
    assert rows["CFG scale=2"]["lpips"] == pytest.approx(float(want.mean()), rel=1e-4)
    with open(tmp_path / "out" / "study.json") as fh:
        assert json.load(fh)["definition"]["metric_options"]["lpips"]["linear"] == str(linear)


def test_lpips_rejects_a_foreign_checkpoint(tmp_path):
    _, linear = save_random_lpips(tmp_path, "alex")
    torch.save({"features.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(MetricWeightsError, match=r"lpips: the alex backbone checkpoint lacks"):
        lpips_network({"backbone": str(tmp_path / "bad.pth"), "linear": str(linear)}, "cpu")
    with pytest.raises(StudyError, match=r"metric_options.lpips.net: unknown network 'squeeze'"):
        Study(
            "s",
            rules=(RuleGrid("CFG", scale=2.0),),
            metrics=("lpips",),
            metric_options={"lpips": {"net": "squeeze"}},
        ).validate()
    assert len(lpips_backbone("alex")) == 12
