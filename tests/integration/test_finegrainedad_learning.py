"""Does FineGrainedAD's design localise anomalies: trained multi-level prompts with token-wise routing, against
untrained prompts and two Tab. 5 ablations? (issue 24)

A random text tower knows nothing of images, so the tiny backbone is first given a little CLIP-style knowledge: 60
AdamW steps that align its V-V tokens with component and background words ("black background.", "a grey disc.") on
procedural *normal* disc images from other seeds than the test data. No defect, and no defect word, is ever seen by
the alignment: the test defects (painted ellipses and scratches of the demo data) are concepts the backbone was
never aligned on. FineGrainedAD (``variant: paper``) is then fit on the demo data's two shots, from one
initialisation, in four arms: untrained prompts (lr 0), the full method, the image-level-only ablation and the
average-all-levels ablation (no token-wise inference). The prompt-guided map alone (``textual_map``) is scored with
sklearn's pixel AUROC; Eq. 4's level choice is scored on the test tokens against the planted component masks (a
disc token must go to a component level, a background token to the background level; defect tokens excluded).

Pass conditions (margins stated):

* AUROC (15 epochs, seed 0): the full method beats untrained prompts by ≥ MARGIN = 0.05 pixel AUROC. The two
  ablations are printed, not asserted.
* Routing (45 epochs, seeds 0 and 1): Eq. 4 sends ≥ 90 % of the normal test tokens to their planted level, ≥ 0.3
  more than untrained prompts and Query Former, and ≥ 0.05 more than the same fit trained with the objective it
  replaced (maximise each query's cosines to its level, :func:`previous_objective`). After 15 epochs the queries at
  the tiny backbone's D = 48 are still near one another (max pairwise cos 0.997) and most disc tokens go to the
  image level; 30–45 epochs separate them enough to route.

Measured (pixel AUROC; routing in brackets):

| seed | epochs | untrained | full | image level only | average all levels | previous objective |
|---|---|---|---|---|---|---|
| 0 | 15 | 0.321 (0.620) | 0.912 (0.620) | 0.294 | 0.380 | |
| 1 | 15 | 0.301 (0.002) | 0.413 (0.760) | 0.288 | 0.604 | |
| 0 | 45 | 0.321 (0.620) | 0.320 (0.977) | | | 0.303 (0.903) |
| 1 | 45 | 0.301 (0.002) | 0.214 (0.967) | | | 0.373 (0.814) |

Every pixel AUROC but one is low: the backbone never learnt what a defect is, so an abnormal prompt is rarely nearer
a defect token than a normal prompt is; the comparison between arms is what this test is for. Longer training
routes well but does not localise better on this stand-in (0.320 and 0.214 at 45 epochs).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from fsad.cli import FsadCLI
from fsad.datamodules.synthetic import _normal_image
from fsad.lightning_modules.components.clip import BackboneSpec, ClipBackbone

REPO = Path(__file__).resolve().parents[2]
MARGIN = 0.05  # measured 0.591 (seed 0) and 0.112 (seed 1)
AUROC_EPOCHS = 15  # the AUROC comparison's training length (lr 0.05)
ROUTING_EPOCHS = 45  # the routing test's: long enough for the Query Former to separate at D = 48
ROUTING_FLOOR = 0.9  # share of normal test tokens Eq. 4 must send to their planted level (measured 0.977, 0.967)
ROUTING_GAIN = 0.3  # over untrained prompts and Query Former (measured +0.357, +0.966)
CONTROL_GAP = 0.05  # over the objective it replaced (measured +0.075, +0.153)
CONCEPTS = (  # component and background words only, a few phrasings each: no defect concept
    ("black background.", "a dark background.", "the black background around the object."),
    ("a grey disc.", "a round grey disc with stripes.", "grey radial stripes on a disc."),
)
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:backbone.pretrained is null")]


def procedural_batch(rng: np.random.Generator, backbone: ClipBackbone, count: int = 16):
    """Normal disc images (no defects) and each token's concept: background (0) or disc (1)."""
    mean = torch.tensor(backbone.image_mean).view(3, 1, 1)
    std = torch.tensor(backbone.image_std).view(3, 1, 1)
    grid = backbone.grid[0]
    images, labels = [], []
    for _ in range(count):
        image, _ = _normal_image("disc", rng)
        concept = torch.from_numpy(disc_mask(image)).long()
        pixels = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255
        pixels = F.interpolate(pixels, size=backbone.image_size, mode="bicubic", antialias=True, align_corners=False)
        images.append((pixels[0] - mean) / std)
        shares = F.adaptive_avg_pool2d(concept[None, None].float(), grid)[0, 0]
        labels.append((shares > 0.5).long().flatten())
    return torch.stack(images), torch.stack(labels)


def disc_mask(image: np.ndarray) -> np.ndarray:
    """The planted disc of a demo image: the generator paints the background at grey level 30 (noise σ 4) and the
    disc at 120–180, so a channel mean above 75 is disc."""
    return image.mean(axis=-1) > 75


def planted_disc_tokens(images: torch.Tensor, backbone: ClipBackbone) -> torch.Tensor:
    """[B,N] tokens more than half covered by the planted disc of normalised test images [B,3,H,W]."""
    std, mean = torch.tensor(backbone.image_std).view(3, 1, 1), torch.tensor(backbone.image_mean).view(3, 1, 1)
    pixels = ((images * std + mean) * 255).permute(0, 2, 3, 1).numpy()
    disc = torch.from_numpy(disc_mask(pixels)).float()[:, None]
    return F.adaptive_avg_pool2d(disc, backbone.grid).flatten(1) > 0.5


@pytest.fixture(scope="module")
def procedural_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fsad-tiny after 60 steps of dense token–text alignment on procedural normal images (seed 1000, not the test
    data), on component and background words alone."""
    torch.manual_seed(0)
    backbone = ClipBackbone(BackboneSpec(arch="fsad-tiny", pretrained=None, taps=[2, 4]), image_size=96)
    clip = backbone.clip
    trained = [p for name, p in clip.named_parameters() if name != "token_embedding.weight"]
    for parameter in trained:
        parameter.requires_grad_(True)
    optimiser = torch.optim.AdamW(trained, lr=1e-3, weight_decay=0.0)
    rng = np.random.default_rng(1000)
    forward = ClipBackbone.forward.__wrapped__  # the same one-pass forward, with gradients
    for _ in range(60):
        images, labels = procedural_batch(rng, backbone)
        with torch.enable_grad():
            tokens = F.normalize(forward(backbone, images).vv_tokens, dim=-1)
            phrasing = [concept[int(rng.integers(len(concept)))] for concept in CONCEPTS]
            texts = F.normalize(clip.encode_text(backbone.tokenize(phrasing)), dim=-1)
            logits = 20 * tokens @ texts.T
            loss = F.cross_entropy(logits.reshape(-1, len(CONCEPTS)), labels.flatten())
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    path = tmp_path_factory.mktemp("procedural-clip") / "fsad-tiny-procedural.pt"
    torch.save(clip.state_dict(), path)
    return path


def fit_and_score(
    tmp_path: Path, checkpoint: Path, lr: float, seed: int, *switches: str, epochs: int = AUROC_EPOCHS
) -> dict[str, float]:
    """Fit FineGrainedAD on the demo data's shots; sklearn's pixel AUROC of the prompt-guided map alone, and the
    share of normal test tokens Eq. 4 routes to their planted level (disc → a component level, background →
    the background level)."""
    cli = FsadCLI(args=[
        "-c", str(REPO / "configs/finegrainedad/synthetic_tiny.yaml"), "--run_root", str(tmp_path / "runs"),
        "--model.init_args.backbone.checkpoint", str(checkpoint), "--trainer.max_epochs", str(epochs),
        "--model.init_args.lr", str(lr), "--model.init_args.eta_min", "0",
        "--data.init_args.root", str(tmp_path / "synthetic"), "--seed_everything", str(seed), *switches,
    ], run=False)  # fmt: skip
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if type(c).__name__ != "ResultsWriter"]
    module, data = cli.model, cli.datamodule
    cli.trainer.fit(module, datamodule=data)
    model = module.model
    model.cache_text(module.backbone)
    names = model.level_names
    components = [names.index(n) for n in names if n.startswith("component:")]
    maps, masks, routed = [], [], []
    with torch.no_grad():
        for batch in data.test_dataloader():
            features = module.backbone(batch.image)
            grid = model.textual_map(features, module.backbone).reshape(-1, 1, *features.grid)
            maps.append(F.interpolate(grid, size=batch.gt_mask.shape[-2:], mode="bilinear", align_corners=False))
            masks.append(batch.gt_mask)
            if components:
                tokens = F.normalize(features.vv_tokens, dim=-1)
                chosen = (tokens @ model.levels["queries"].T).argmax(-1)  # Eq. 4's level choice
                disc = planted_disc_tokens(batch.image, module.backbone)
                defect = F.adaptive_avg_pool2d(batch.gt_mask.float(), features.grid).flatten(1) > 0
                correct = torch.where(
                    disc, torch.isin(chosen, torch.tensor(components)), chosen == names.index("background")
                )
                routed.append(correct[~defect].float())
    auroc = roc_auc_score(torch.cat(masks).flatten().numpy() > 0, torch.cat(maps).flatten().numpy())
    return {"pixel_auroc": auroc, "routing": float(torch.cat(routed).mean()) if routed else float("nan")}


ARMS = {
    "untrained": (0.0,),
    "full": (0.05,),
    "image level only": (0.05, "--model.init_args.image_level_only", "true"),
    "average all levels": (0.05, "--model.init_args.token_wise_inference", "false"),
}


def test_the_full_method_beats_untrained_prompts(tmp_path: Path, procedural_checkpoint: Path) -> None:
    seed = 0
    runs = {
        name: fit_and_score(tmp_path / name.replace(" ", "_"), procedural_checkpoint, lr, seed, *switches)
        for name, (lr, *switches) in ARMS.items()
    }
    print(
        "\n".join(f"{name}: pixel AUROC {r['pixel_auroc']:.3f}, routing {r['routing']:.3f}" for name, r in runs.items())
    )
    assert runs["full"]["pixel_auroc"] - runs["untrained"]["pixel_auroc"] >= MARGIN, runs


def previous_objective(queries: torch.Tensor, normal: torch.Tensor, abnormal: torch.Tensor, **_: float) -> torch.Tensor:
    """The Query Former objective as first implemented, the control: 2 − cos(q_l, p̄ⁿ_l) − cos(q_l, p̄ᵃ_l), mean over
    levels (its optimum is the same shared direction for every query)."""
    return (2 - (queries * normal).sum(-1) - (queries * abnormal).sum(-1)).mean()


@pytest.mark.parametrize("seed", [0, 1])
def test_eq4_routes_normal_tokens_to_their_planted_level_after_training(
    tmp_path: Path, procedural_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    """After 45 epochs (lr 0.05) Eq. 4 sends ≥ 90 % of the normal test tokens to their planted level, ≥ 0.3 more
    than untrained prompts and queries, and ≥ 0.05 more than the same fit with the objective it replaced."""
    full = fit_and_score(tmp_path / "full", procedural_checkpoint, 0.05, seed, epochs=ROUTING_EPOCHS)
    untrained = fit_and_score(tmp_path / "untrained", procedural_checkpoint, 0.0, seed, epochs=ROUTING_EPOCHS)
    monkeypatch.setattr("fsad.lightning_modules.finegrainedad.model.query_former_loss", previous_objective)
    control = fit_and_score(tmp_path / "control", procedural_checkpoint, 0.05, seed, epochs=ROUTING_EPOCHS)
    print(f"routing: full {full['routing']:.3f}, untrained {untrained['routing']:.3f}, "
          f"previous objective {control['routing']:.3f}; pixel AUROC full {full['pixel_auroc']:.3f}")  # fmt: skip
    assert full["routing"] >= ROUTING_FLOOR, full
    assert full["routing"] - untrained["routing"] >= ROUTING_GAIN, (full, untrained)
    assert full["routing"] - control["routing"] >= CONTROL_GAP, (full, control)
