"""FineGrainedAD's Tab. 5 ablation switches: each changes the part it names and nothing else.

Every module is built from the same seed on the demo disc record (two components) with the tiny backbone; a summary
takes the parts a switch could touch — the levels, the prompt bodies the text tower encodes, which groups carry
Attr-MoE weights, the support region weights, the prompt-guided token map — and each ablation must differ from the
full method in exactly its own parts, with the changed part checked against its definition written here. The region
weights follow the component NHP features (the clustering's reference), so a switch that changes those prompts moves
them too; the token map follows every prompt.
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml

from fsad.lightning_modules.components.clip import BackboneSpec
from fsad.lightning_modules.finegrainedad.module import FineGrainedAD

REPO = Path(__file__).resolve().parents[2]
SLOT = re.compile(r"\{slot:\w+\}")
pytestmark = pytest.mark.filterwarnings("ignore:backbone.pretrained is null")


def summary(**switches) -> dict:
    """Build a paper-variant FineGrainedAD with ``switches`` and read out its parts (same seed for every call)."""
    torch.manual_seed(0)
    module = FineGrainedAD(BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[2, 4]), image_size=96, **switches)
    built = {}
    build = module.model.prompts.build
    module.model.prompts.build = lambda backbone, groups: (built.update(groups), build(backbone, groups))
    module.prepare_for_data(SimpleNamespace(dataset_name="synthetic", category="disc"))
    support = torch.rand(2, 3, 4 * 96, 4 * 96, generator=torch.Generator().manual_seed(1))
    regions = module.compute_region_weights(["a.png", "b.png"], support)
    tokens = torch.randn(1, 36, module.backbone.embed_dim, generator=torch.Generator().manual_seed(2))
    features = SimpleNamespace(vv_tokens=tokens)
    with torch.no_grad():
        textual = module.model.textual_map(features, module.backbone)
    return {
        "levels": module.model.level_names,
        "bodies": {name: (g.normal, g.abnormal, g.learnable_abnormal) for name, g in built.items()},
        "gates": {name: g.gated for name, g in built.items()},
        "regions": torch.stack(list(regions.values())),
        "textual": textual,
        "module": module,
        "tokens": F.normalize(tokens, dim=-1),
    }


def differing(full: dict, ablated: dict) -> set[str]:
    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return a.shape == b.shape and torch.allclose(a, b, atol=1e-6)
        return a == b

    return {key for key in ("levels", "bodies", "gates", "regions", "textual") if not same(full[key], ablated[key])}


@pytest.fixture(scope="module")
def full() -> dict:
    return summary()


def two_way(tokens, normal, abnormal, t) -> torch.Tensor:
    """softmax(t·[⟨v,p̄ⁿ⟩, ⟨v,p̄ᵃ⟩])₁ for every token and level: [..., L]."""
    return torch.softmax(t * torch.stack([tokens @ normal.T, tokens @ abnormal.T], -1), -1)[..., 1]


def test_the_full_method_routes_each_token_by_eq4(full: dict) -> None:
    model = full["module"].model
    levels, t = model.levels, model.temperature(full["module"].backbone)
    scores = two_way(full["tokens"], levels["normal"], levels["abnormal"], t)
    chosen = (full["tokens"] @ levels["queries"].T).argmax(-1)
    torch.testing.assert_close(full["textual"], scores.gather(-1, chosen[..., None])[..., 0])
    assert not torch.equal(full["regions"], torch.ones_like(full["regions"]))
    assert any(full["gates"].values()) and any(SLOT.search(b) for bodies in full["bodies"].values() for b in bodies[0])


def test_no_token_wise_inference_averages_every_level_and_changes_nothing_else(full: dict) -> None:
    ablated = summary(token_wise_inference=False)
    assert differing(full, ablated) == {"textual"}
    model = ablated["module"].model
    levels, t = model.levels, model.temperature(ablated["module"].backbone)
    expected = two_way(ablated["tokens"], levels["normal"], levels["abnormal"], t).mean(-1)
    torch.testing.assert_close(ablated["textual"], expected)


def test_image_level_only_keeps_the_image_prompts_alone(full: dict) -> None:
    ablated = summary(image_level_only=True)
    assert differing(full, ablated) == {"levels", "bodies", "gates", "regions", "textual"}
    assert ablated["levels"] == ["image"]
    assert ablated["bodies"] == {"image": full["bodies"]["image"]}
    assert torch.equal(ablated["regions"], torch.ones_like(ablated["regions"]))  # nothing to aggregate


def test_no_region_aggregation_weighs_every_token_one(full: dict) -> None:
    ablated = summary(region_aggregation=False)
    assert differing(full, ablated) == {"regions"}
    assert ablated["regions"].shape == full["regions"].shape
    assert torch.equal(ablated["regions"], torch.ones_like(ablated["regions"]))


def test_no_attr_moe_keeps_the_placeholders_ungated(full: dict) -> None:
    ablated = summary(attr_moe=False)
    assert differing(full, ablated) == {"gates", "regions", "textual"}  # regions: clustered by component NHPs
    assert not any(ablated["gates"].values())
    assert ablated["module"].model.prompts.slot_gate_logits is None
    assert ablated["module"].model.prompts.normal_placeholders is not None


def test_no_placeholders_writes_the_values_back_and_keeps_every_handcrafted_prompt(full: dict) -> None:
    ablated = summary(placeholders=False)
    assert differing(full, ablated) == {"bodies", "gates", "regions", "textual"}  # regions: clustered by NHPs
    for name, (normal, abnormal, learnable) in ablated["bodies"].items():
        full_normal, full_abnormal, full_learnable = full["bodies"][name]
        assert abnormal == full_abnormal  # AHPs: untouched
        assert normal == [SLOT.sub("", body).replace("  ", " ").replace(" .", ".") for body in full_normal]
        # ALPs holding placeholders become the level's NHP text (concatenation alone); others stay
        assert learnable == (normal if any(SLOT.search(b) for b in full_learnable) else full_learnable)
        assert not any(SLOT.search(body) for body in [*normal, *learnable])
    assert not any(ablated["gates"].values())


def test_eq6_is_off_by_default_and_its_switch_changes_the_map_alone(full: dict) -> None:
    """Eq. 6 in our reading, sqrt(M_p ⊙ M_img), M_img from the image level's ALP prototype."""
    assert not full["module"].model.image_reweighting
    on = summary(image_reweighting=True)
    assert differing(full, on) == {"textual"}
    model = on["module"].model
    levels, t = model.levels, model.temperature(on["module"].backbone)
    image = model.level_names.index("image")
    image_map = two_way(on["tokens"], levels["normal"][image : image + 1], levels["image_learnable"][None], t)[..., 0]
    torch.testing.assert_close(on["textual"], (full["textual"] * image_map).sqrt())


def test_temperature_default_is_the_authors_logit_scale() -> None:
    module = FineGrainedAD(BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[2, 4]), image_size=96)
    logit_scale = float(module.backbone.clip.logit_scale)
    assert float(module.model.temperature(module.backbone)) == pytest.approx(logit_scale)
    clip_like = FineGrainedAD(
        BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[2, 4]), image_size=96, temperature_quirk=False
    )
    assert float(clip_like.model.temperature(clip_like.backbone)) == pytest.approx(torch.tensor(logit_scale).exp())


def test_placeholders_off_is_refused_in_the_code_variant() -> None:
    with pytest.raises(ValueError, match="model.placeholders"):
        FineGrainedAD(BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[1, 3]), variant="code", placeholders=False)


@pytest.mark.parametrize(
    ("config", "switch", "value"),
    [
        ("no_token_wise", "token_wise_inference", False),
        ("image_level_only", "image_level_only", True),
        ("no_region_aggregation", "region_aggregation", False),
        ("no_attr_moe", "attr_moe", False),
        ("no_placeholders", "placeholders", False),
        ("no_image_reweighting", "image_reweighting", False),
    ],
)
def test_each_ablation_config_sets_its_one_switch(config: str, switch: str, value: bool) -> None:
    overlay = yaml.safe_load((REPO / f"configs/finegrainedad/ablations/{config}.yaml").read_text())
    assert overlay == {"model": {"init_args": {switch: value}}}
