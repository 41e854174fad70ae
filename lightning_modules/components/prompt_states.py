"""Abnormal-state vocabulary for handcrafted abnormal prompts (our wording of each category's real defect types).

``GENERIC_STATES`` are PromptAD's eight category-free states; ``CATEGORY_DEFECTS`` adds the defect types each
benchmark category actually has, in our wording. ``AUTHORS_CATEGORY_DEFECTS`` lists the defect states as the
released PromptAD code words them (FuNz-0/PromptAD ``PromptAD/ad_prompts.py`` at 0f86ce0, ``class_state_abnormal``),
which ``variant: code`` uses so its prompts are token for token the authors'. Every state holds one ``{}`` for the
object name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from fsad.lightning_modules.components.clip import ClipBackbone

GENERIC_STATES = (
    "damaged {}", "flawed {}", "abnormal {}", "imperfect {}", "blemished {}",
    "{} with flaw", "{} with defect", "{} with damage",
)  # fmt: skip

# State ensemble of AnomalyGPT, KAG-prompt and APRIL-GAN: the normal and the anomalous side, one ``{}`` each.
ENSEMBLE_NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                          "{} without damage")  # fmt: skip
ENSEMBLE_ABNORMAL_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")


@torch.no_grad()
def state_ensemble_features(backbone: ClipBackbone, name: str, templates: tuple[str, ...]) -> torch.Tensor:
    """[2,D] (normal, anomalous) text features of the state ensemble: every state × template sentence about ``name``
    encoded and normalised, averaged per side and renormalised (KAG-prompt's and APRIL-GAN's text side)."""
    sides = []
    for states in (ENSEMBLE_NORMAL_STATES, ENSEMBLE_ABNORMAL_STATES):
        texts = [template.format(state.format(name)) for state in states for template in templates]
        encoded = F.normalize(backbone.encode_text(backbone.tokenize(texts)), dim=-1)
        sides.append(F.normalize(encoded.mean(0), dim=-1))
    return torch.stack(sides)


DISPLAY_NAMES = {
    "metal_nut": "metal nut", "pcb1": "printed circuit board", "pcb2": "printed circuit board",
    "pcb3": "printed circuit board", "pcb4": "printed circuit board", "pipe_fryum": "pipe fryum",
    "macaroni1": "macaroni", "macaroni2": "macaroni", "chewinggum": "chewing gum", "pcb": "printed circuit board",
    "transistor1": "transistor", "terminalblock": "terminal block", "vcpill": "pill", "u_block": "u-shaped block",
}  # fmt: skip

CATEGORY_DEFECTS: dict[str, tuple[str, ...]] = {
    # MVTec-AD
    "bottle": ("{} with a large breakage", "{} with a small breakage", "{} with contamination"),
    "cable": ("{} with a bent wire", "{} with a missing wire", "{} with a cut inner insulation",
              "{} with a poked insulation", "{} with swapped wires", "{} with a missing cable"),
    "capsule": ("{} with a crack", "{} with faulty imprint", "{} with a poke", "{} with a scratch", "squeezed {}"),
    "carpet": ("{} with a colour stain", "{} with a cut", "{} with a hole", "{} with metal contamination",
               "{} with a thread"),
    "grid": ("{} with a bent wire", "{} with a broken wire", "{} with glue", "{} with metal contamination",
             "{} with a thread"),
    "hazelnut": ("{} with a crack", "{} with a cut", "{} with a hole", "{} with a printed mark"),
    "leather": ("{} with a colour stain", "{} with a cut", "{} with a fold", "{} with glue", "{} with a poke"),
    "metal_nut": ("{} with a bent edge", "{} with a colour stain", "flipped {}", "{} with a scratch"),
    "pill": ("{} with a colour stain", "{} with contamination", "{} with a crack", "{} with faulty imprint",
             "{} with a pill-type mismatch", "{} with a scratch"),
    "screw": ("{} with a manipulated front", "{} with a scratched head", "{} with a scratched neck",
              "{} with a damaged thread side", "{} with a damaged thread top"),
    "tile": ("{} with a crack", "{} with glue strip", "{} with gray stroke", "{} with oil", "{} with rough surface"),
    "toothbrush": ("{} with defective bristles",),
    "transistor": ("{} with a bent lead", "{} with a cut lead", "{} with a damaged case", "misplaced {}"),
    "wood": ("{} with a colour stain", "{} with a combined defect", "{} with a hole", "{} with liquid",
             "{} with a scratch"),
    "zipper": ("{} with broken teeth", "{} with a combined defect", "{} with fabric border damage",
               "{} with fabric interior damage", "{} with split teeth", "{} with rough teeth", "{} with squeezed teeth"),
    # VisA
    "candle": ("{} with a chunk of wax missing", "{} with a damaged corner", "{} with a foreign particle",
               "{} with extra wax", "{} with a weird wick", "{} with wax melded out"),
    "capsules": ("{} with a bubble", "{} with a discolouration", "{} with a leak", "{} with a misshape"),
    "cashew": ("{} with a breakage", "{} with a burn", "{} with a stuck partner", "{} with a hole",
               "{} with a stain"),
    "chewinggum": ("{} with a chunk missing", "{} with a corner missing", "{} with scratches", "{} with a stain"),
    "fryum": ("{} with a breakage", "{} with burnt spots", "{} with a colour defect", "{} with a fryum stuck",
              "{} with a similar colour spot"),
    "macaroni1": ("{} with a chip", "{} with a middle breakage", "{} with a crack", "{} with a small scratch"),
    "macaroni2": ("{} with a breakage", "{} with a colour spot", "{} with a crack", "{} with a hole",
                  "{} with a scratch"),
    "pcb1": ("{} with a bent component", "{} with a melted component", "{} with a missing component",
             "{} with scratches"),
    "pcb2": ("{} with a bent component", "{} with a melted component", "{} with a missing component",
             "{} with scratches"),
    "pcb3": ("{} with a bent component", "{} with a melted component", "{} with a missing component",
             "{} with scratches"),
    "pcb4": ("{} with burnt spots", "{} with a damaged component", "{} with extra components",
             "{} with a missing component", "{} with scratches", "{} with a wrong component"),
    "pipe_fryum": ("{} with a breakage", "{} with burnt spots", "{} with a crack", "{} with a stuck piece"),
    # Real-IAD (defect types of the dataset: pit, deformation, abrasion, scratch, damage, missing, foreign, contamination)
    **{
        category: ("{} with a pit", "deformed {}", "{} with abrasion", "{} with a scratch", "damaged {}",
                   "{} with a missing part", "{} with a foreign object", "{} with contamination")
        for category in (
            "audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint", "mounts", "pcb",
            "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll", "regulator", "rolled_strip_base",
            "sim_card_set", "switch", "tape", "terminalblock", "toy", "toy_brick", "transistor1", "u_block", "usb",
            "usb_adaptor", "vcpill", "wooden_beads", "woodstick",
        )
    },
}  # fmt: skip


#: The defect states of the released PromptAD code, per MVTec-AD and VisA category (facts from its vocabulary).
AUTHORS_CATEGORY_DEFECTS: dict[str, tuple[str, ...]] = {
    "bottle": ("{} with large breakage", "{} with small breakage", "{} with contamination"),
    "toothbrush": ("{} with defect", "{} with anomaly"),
    "carpet": ("{} with hole", "{} with color stain", "{} with metal contamination", "{} with thread residue",
               "{} with thread", "{} with cut"),
    "hazelnut": ("{} with crack", "{} with cut", "{} with hole", "{} with print"),
    "leather": ("{} with color stain", "{} with cut", "{} with fold", "{} with glue", "{} with poke"),
    "cable": ("{} with bent wire", "{} with missing part", "{} with missing wire", "{} with cut", "{} with poke"),
    "capsule": ("{} with crack", "{} with faulty imprint", "{} with poke", "{} with scratch",
                "{} squeezed with compression"),
    "grid": ("{} with breakage", "{} with thread residue", "{} with thread", "{} with metal contamination",
             "{} with glue", "{} with a bent shape"),
    "pill": ("{} with color stain", "{} with contamination", "{} with crack", "{} with faulty imprint",
             "{} with scratch", "{} with abnormal type"),
    "transistor": ("{} with bent lead", "{} with cut lead", "{} with damage", "{} with misplaced transistor"),
    "metal_nut": ("{} with a bent shape", "{} with color stain", "{} with a flipped orientation", "{} with scratch"),
    "screw": ("{} with manipulated front", "{} with scratch neck", "{} with scratch head"),
    "zipper": ("{} with broken teeth", "{} with fabric border", "{} with defect fabric", "{} with broken fabric",
               "{} with split teeth", "{} with squeezed teeth"),
    "tile": ("{} with crack", "{} with glue strip", "{} with gray stroke", "{} with oil", "{} with rough surface"),
    "wood": ("{} with color stain", "{} with hole", "{} with scratch", "{} with liquid"),
    "candle": ("{} with melded wax", "{} with foreign particals", "{} with extra wax", "{} with chunk of wax missing",
               "{} with weird candle wick", "{} with damaged corner of packaging", "{} with different colour spot"),
    "capsules": ("{} with scratch", "{} with discolor", "{} with misshape", "{} with leak", "{} with bubble"),
    "cashew": ("{} with breakage", "{} with small scratches", "{} with burnt", "{} with stuck together",
               "{} with spot"),
    "chewinggum": ("{} with corner missing", "{} with scratches", "{} with chunk of gum missing",
                   "{} with colour spot", "{} with cracks"),
    "fryum": ("{} with breakage", "{} with scratches", "{} with burnt", "{} with colour spot",
              "{} with fryum stuck together", "{} with colour spot"),
    "macaroni1": ("{} with color spot", "{} with small chip around edge", "{} with small scratches",
                  "{} with breakage", "{} with cracks"),
    "macaroni2": ("{} with color spot", "{} with small chip around edge", "{} with small scratches",
                  "{} with breakage", "{} with cracks"),
    "pcb1": ("{} with bent", "{} with scratch", "{} with missing", "{} with melt"),
    "pcb2": ("{} with bent", "{} with scratch", "{} with missing", "{} with melt"),
    "pcb3": ("{} with bent", "{} with scratch", "{} with missing", "{} with melt"),
    "pcb4": ("{} with scratch", "{} with extra", "{} with missing", "{} with wrong place", "{} with damage",
             "{} with burnt", "{} with dirt"),
    "pipe_fryum": ("{} with breakage", "{} with small scratches", "{} with burnt", "{} with stuck together",
                   "{} with colour spot", "{} with cracks"),
}  # fmt: skip

Wording = Literal["ours", "authors"]


def display_name(category: str) -> str:
    """The object name used in prompts: ``pcb4`` → ``printed circuit board``, ``metal_nut`` → ``metal nut``."""
    return DISPLAY_NAMES.get(category, category.replace("_", " "))


def abnormal_states(category: str, wording: Wording = "ours") -> tuple[str, ...]:
    """The generic states plus the category's own defect states (generic only for unknown categories).

    ``wording="authors"`` takes the category states as the released PromptAD code words them (``variant: code``);
    a category that code does not know falls back to ours.
    """
    table = (
        AUTHORS_CATEGORY_DEFECTS if wording == "authors" and category in AUTHORS_CATEGORY_DEFECTS else CATEGORY_DEFECTS
    )
    return GENERIC_STATES + table.get(category, ())
