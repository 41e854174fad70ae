"""Abnormal-state vocabulary for handcrafted abnormal prompts (our wording of each category's real defect types).

``GENERIC_STATES`` are PromptAD's eight category-free states; ``CATEGORY_DEFECTS`` adds the defect types each
benchmark category actually has. Every state holds one ``{}`` for the object name.
"""

from __future__ import annotations

GENERIC_STATES = (
    "damaged {}", "flawed {}", "abnormal {}", "imperfect {}", "blemished {}",
    "{} with flaw", "{} with defect", "{} with damage",
)  # fmt: skip

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


def display_name(category: str) -> str:
    """The object name used in prompts: ``pcb4`` → ``printed circuit board``, ``metal_nut`` → ``metal nut``."""
    return DISPLAY_NAMES.get(category, category.replace("_", " "))


def abnormal_states(category: str) -> tuple[str, ...]:
    """The generic states plus the category's own defect states (generic only for unknown categories)."""
    return GENERIC_STATES + CATEGORY_DEFECTS.get(category, ())
