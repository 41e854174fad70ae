"""Language-guided region aggregation (FineGrainedAD MLSA): DPC-KNN clustering of support tokens into regions.

The paper's four modifications of DPC-KNN are all here: semantic initial centres (:func:`dpc_knn` ``seeds``), the
prompt-similarity reference dimension (:func:`reference_features`), two-stage foreground/background then component
clustering (:func:`aggregate_regions`), and high-resolution slicing (:func:`slice_tiles` / :func:`stitch_tiles`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def dpc_knn(
    points: torch.Tensor, n_clusters: int, k: int, seeds: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Density-peak clustering with k-nearest-neighbour density; returns (labels [N], centre indices [C]).

    ρ_i = exp(−mean_{j∈kNN(i)} d_ij²); δ_i = distance to the nearest point of higher density (the densest point gets
    its largest distance); centres are the points of highest ρ·δ. ``seeds`` (point indices) are taken as centres
    first, the semantic initial centres; the rest come from ρ·δ. Every point joins its nearest centre.
    """
    n = points.shape[0]
    if n_clusters > n:
        raise ValueError(f"cannot form {n_clusters} clusters from {n} points")
    distances = torch.cdist(points.float(), points.float())
    knn = distances.topk(min(k + 1, n), largest=False).values[:, 1:]
    density = torch.exp(-(knn**2).mean(dim=1))
    # break density ties by index so that "higher density" is a strict order
    order_key = density + torch.arange(n, device=points.device) * 1e-12
    higher = order_key.unsqueeze(0) > order_key.unsqueeze(1)
    delta = torch.where(higher, distances, torch.full_like(distances, float("inf"))).amin(dim=1)
    densest = torch.isinf(delta)
    delta[densest] = distances[densest].amax(dim=1)
    score = density * delta
    chosen: list[int] = [] if seeds is None else list(dict.fromkeys(int(s) for s in seeds))[:n_clusters]
    for index in score.argsort(descending=True).tolist():
        if len(chosen) == n_clusters:
            break
        if index not in chosen:
            chosen.append(index)
    centres = torch.tensor(chosen, device=points.device)
    labels = distances[:, centres].argmin(dim=1)
    return labels, centres


def reference_features(tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """The prompt-similarity reference dimension: each token becomes its cosine vector to the prompts [N,P]."""
    return F.normalize(tokens, dim=-1) @ F.normalize(prompts, dim=-1).T


def slice_tiles(images: torch.Tensor, factor: int, tile: int) -> torch.Tensor:
    """Upsample [K,3,S,S] images ``factor``× and cut them into factor² tiles of ``tile`` px: [K·factor²,3,tile,tile]."""
    big = F.interpolate(images, size=(tile * factor, tile * factor), mode="bicubic", align_corners=False)
    tiles = big.unfold(2, tile, tile).unfold(3, tile, tile)  # [K,3,f,f,tile,tile]
    return tiles.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1], tile, tile)


def stitch_tiles(tokens: torch.Tensor, shots: int, factor: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`slice_tiles` on token grids: [K·f²,rows·cols,D] → [K, f·rows, f·cols, D]."""
    rows, cols = grid
    dim = tokens.shape[-1]
    blocks = tokens.reshape(shots, factor, factor, rows, cols, dim)
    return blocks.permute(0, 1, 3, 2, 4, 5).reshape(shots, factor * rows, factor * cols, dim)


@dataclass
class Regions:
    """Each level's region over high-resolution support tokens, as the rows of :func:`region_weights`."""

    masks: torch.Tensor  # [N_c+2, K, H, W] bool: the component regions…, the foreground, the background

    @property
    def background(self) -> torch.Tensor:
        return self.masks[-1]


def border_fraction(mask: torch.Tensor) -> torch.Tensor:
    """Fraction of the border tokens of [K,H,W] grids that ``mask`` covers."""
    border = torch.zeros_like(mask)
    border[:, 0], border[:, -1], border[:, :, 0], border[:, :, -1] = True, True, True, True
    return (mask & border).sum() / border.sum()


def aggregate_regions(
    tokens: torch.Tensor,
    component_prompts: torch.Tensor,
    background_prompt: torch.Tensor,
    semantic_seeds: bool = True,
    reference_mode: str = "concat",
    background_rule: str = "prompt",
    k_stage1: int = 8,
    k_stage2: int = 5,
    assignment: str = "one_to_one",
    foreground_prompt: torch.Tensor | None = None,
) -> Regions:
    """Two-stage DPC-KNN over support tokens [K,H,W,D] with the prompt-reference dimension (methods.md §2, 2–5).

    ``reference_mode="concat"`` (the paper's reference *dimension*) clusters [visual token ; cosines to the
    prompts]; ``"replace"`` (the authors' code) clusters the cosine vector alone. Stage 1 splits foreground from
    background (2 clusters). With ``background_rule="border"`` the background is the cluster covering more of the
    image border (benchmark objects sit centred on a uniform background); with ``"prompt"`` (the authors' rule) it
    is the cluster whose mean token is closer to the background prompt. Stage 2 clusters the foreground into
    N_c + 1 groups. With ``assignment="one_to_one"`` (the paper: each component has its own region) components and
    clusters are matched one to one, maximising the summed prompt-to-cluster-mean similarity (Hungarian
    assignment); with ``"argmax"`` (the authors' code) each component prompt claims its most similar cluster, so two
    components may share one and another is left with none.

    With ``foreground_prompt`` (the paper's two-stage clustering) stage 1 is guided by the foreground- and
    background-level prompts alone (reference = cosines to those two, seeds = the tokens most like each) and stage 2
    by the component prompts alone; without it (the code) both stages use the cosines to [components…, background].
    """
    if assignment not in ("one_to_one", "argmax"):
        raise ValueError(f"assignment must be 'one_to_one' or 'argmax', got {assignment!r}")
    if reference_mode not in ("concat", "replace"):
        raise ValueError(f"reference_mode must be 'concat' or 'replace', got {reference_mode!r}")
    if background_rule not in ("border", "prompt"):
        raise ValueError(f"background_rule must be 'border' or 'prompt', got {background_rule!r}")
    shots, height, width, dim = tokens.shape
    flat = F.normalize(tokens.reshape(-1, dim), dim=-1)

    def with_reference(points: torch.Tensor, similarities: torch.Tensor) -> torch.Tensor:
        return similarities if reference_mode == "replace" else torch.cat([points, similarities], dim=1)

    if foreground_prompt is None:
        stage1_prompts = torch.cat([component_prompts, background_prompt.unsqueeze(0)])
        stage2_prompts = stage1_prompts
    else:
        stage1_prompts = torch.stack([foreground_prompt, background_prompt])
        stage2_prompts = component_prompts
    similarities = reference_features(flat, stage1_prompts)
    seeds = None
    if semantic_seeds:  # the token most like the foreground prompt(s) and the token most like the background prompt
        seeds = torch.stack([similarities[:, :-1].amax(dim=1).argmax(), similarities[:, -1].argmax()])
    stage1, _ = dpc_knn(with_reference(flat, similarities), 2, k_stage1, seeds)
    if background_rule == "border":
        grids = stage1.reshape(shots, height, width)
        evidence = torch.stack([border_fraction(grids == c) for c in range(2)])
    else:
        bg_prompt = F.normalize(background_prompt, dim=-1)
        evidence = torch.stack([F.normalize(flat[stage1 == c].mean(0), dim=-1) @ bg_prompt for c in range(2)])
    background = stage1 == int(evidence.argmax())
    labels = torch.full((flat.shape[0],), -1, dtype=torch.long, device=flat.device)
    labels[background] = len(component_prompts)
    foreground = (~background).nonzero().squeeze(1)
    n_components = len(component_prompts)
    if len(foreground) > n_components + 1:
        component_similarities = reference_features(flat[foreground], stage2_prompts)
        seeds2 = component_similarities[:, :n_components].argmax(dim=0) if semantic_seeds else None
        stage2, _ = dpc_knn(
            with_reference(flat[foreground], component_similarities), n_components + 1, k_stage2, seeds2
        )
        means = torch.stack([
            F.normalize(flat[foreground][stage2 == c].mean(0), dim=-1) for c in range(n_components + 1)
        ])  # fmt: skip
        similarity = F.normalize(component_prompts, dim=-1) @ means.T  # [N_c, N_c+1]
        if assignment == "one_to_one":
            rows, columns = linear_sum_assignment(similarity.detach().cpu().numpy(), maximize=True)
            claimed = dict(zip(rows.tolist(), columns.tolist(), strict=True))
        else:
            claimed = dict(enumerate(similarity.argmax(dim=1).tolist()))
        for component, cluster in claimed.items():
            labels[foreground[stage2 == cluster]] = component
    masks = torch.stack([*(labels == c for c in range(n_components)), ~background, background])
    return Regions(masks=masks.reshape(-1, shots, height, width))


def region_weights(regions: Regions, grid: tuple[int, int], boost: float = 1.5) -> torch.Tensor:
    """``w_i = 1 + boost·𝟙[token ∈ region i]`` average-pooled to the patch grid: [N_c+2, K, rows, cols] for the
    component regions, the foreground (every token stage 1 did not call background) and the background."""
    return 1.0 + boost * F.adaptive_avg_pool2d(regions.masks.float(), grid)


# ---------------------------------------------------------------------------------------------------------------------
# variant: code — the released clustering (PromptAD/clusters.py and language_guided_progressive_region_aggregation of
# RetoFan233/FineGrainedAD), every quirk kept; methods.md §2 and the README's deviations list describe them.


def released_reference(tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """The code's reference points: each token's cosine to every level prompt, [K,N,D] × [P,D] → [K,N,P]."""
    return (tokens @ prompts.T) / (tokens.norm(dim=-1, keepdim=True) * prompts.norm(dim=-1))


def released_neighbours(requested: int, n_clusters: int) -> int:
    """The code's k-NN size: asked for more neighbours than clusters, it uses ``min(3, max(n_clusters // 2, 1))``,
    so a 2- or 3-cluster split uses k = 1, and the nearest neighbour of a token is the token itself."""
    return min(3, max(n_clusters // 2, 1)) if requested > n_clusters else requested


def released_dpc_knn(
    points: torch.Tensor,
    n_clusters: int,
    k: int,
    token_mask: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The code's DPC-KNN, each shot of [K,N,P] on its own: labels [K,N].

    Distances are Euclidean over √P. ρ = exp(−mean of the k smallest squared distances, the token's own included)
    + 10⁻⁶·``noise`` (``torch.rand`` when None). δ is the distance to the nearest denser token, the largest distance
    of the shot for the densest. The centres are the ``topk`` of δ·ρ, and every token joins its nearest centre.
    ``token_mask`` (> 0 kept) gives masked tokens density 0 and puts them at the batch's largest distance + 1 from
    every token, so a masked token is equally far from every centre and joins centre 0.
    """
    distances = torch.cdist(points.float(), points.float()) / points.shape[-1] ** 0.5
    kept = None if token_mask is None else token_mask > 0
    if kept is not None:
        distances = torch.where(kept[:, None, :], distances, distances.max() + 1)
    density = torch.exp(-(distances.topk(k, dim=-1, largest=False).values ** 2).mean(dim=-1))
    if noise is None:
        noise = torch.rand(density.shape, dtype=density.dtype, device=density.device)
    density = density + noise * 1e-6
    if kept is not None:
        density = density * kept
    denser = density[:, None, :] > density[:, :, None]  # [K,i,j]: token j is denser than token i
    farthest = distances.flatten(1).amax(dim=-1)[:, None, None]
    delta = torch.where(denser, distances, farthest).amin(dim=-1)
    centres = (delta * density).topk(n_clusters, dim=-1).indices  # [K,C]
    labels = distances.gather(1, centres[..., None].expand(-1, -1, distances.shape[-1])).argmin(dim=1)
    return labels.scatter(1, centres, torch.arange(n_clusters, device=labels.device).expand_as(centres))


def aggregate_regions_released(
    reference: torch.Tensor,
    tokens: torch.Tensor,
    prompts: torch.Tensor,
    k_stage1: int = 8,
    k_stage2: int = 5,
    noise: tuple[torch.Tensor, torch.Tensor] | None = None,
    fixed_labels: torch.Tensor | None = None,
) -> Regions:
    """The code's two-stage aggregation of support tokens [K,H,W,D] with ``reference`` = :func:`released_reference`
    [K,H·W,P] against ``prompts`` [P,D] = the normal prompts of components…, background.

    Stage 1 splits each shot in two. Shot 0 decides which side is background: the side whose mean token (each shot's
    own tokens at shot 0's positions) has the larger unnormalised dot product with the background prompt. A shot
    whose decision is "side 1" takes shot 0's inverted partition, the others keep their own. Stage 2 clusters
    every shot into N_c + 1 groups over its foreground; the tokens shot 0 calls background take the label of token 0.
    Every level prompt, the background one included, claims the cluster whose shot-0 mean token it is most similar
    to, so two levels may share a region and a region may be empty. ``noise``: the two stages' density noise.
    ``fixed_labels`` [H·W] replaces the stage-2 labels of every shot after clustering, as the code does for VisA
    ``pcb2`` with its fixed map.
    """
    shots, height, width, dim = tokens.shape
    flat = tokens.reshape(shots, -1, dim)
    n_levels = prompts.shape[0]
    stage1_noise, stage2_noise = (None, None) if noise is None else noise
    stage1 = released_dpc_knn(reference, 2, released_neighbours(k_stage1, 2), noise=stage1_noise)
    shot0 = stage1[0]
    evidence = torch.stack([flat[:, shot0 == side].mean(dim=1) @ prompts[-1] for side in (0, 1)])  # [2,K]
    foreground = torch.where((evidence[0] < evidence[1])[:, None], 1 - shot0, stage1)  # 1 = foreground
    stage2 = released_dpc_knn(
        reference, n_levels, released_neighbours(k_stage2, n_levels), token_mask=foreground, noise=stage2_noise
    )
    source = torch.arange(flat.shape[1], device=flat.device).masked_fill(foreground[0] == 0, 0)
    labels = stage2[:, source] if fixed_labels is None else fixed_labels.to(stage2).expand_as(stage2)
    means = torch.stack([flat[0, labels[0] == cluster].mean(dim=0) for cluster in range(n_levels)])
    claimed = (F.normalize(prompts, dim=-1) @ F.normalize(means, dim=-1).T).argmax(dim=-1)  # [P]
    masks = labels[None] == claimed[:, None, None]  # [P,K,N]: components…, background
    masks = torch.cat([masks[:-1], (foreground == 1)[None], masks[-1:]])
    return Regions(masks=masks.reshape(n_levels + 1, shots, height, width))


def released_region_weights(regions: Regions, grid: tuple[int, int], boost: float = 1.5) -> torch.Tensor:
    """The code's region weights: ``1 + boost·𝟙`` at full resolution, then its "4×4 average pool", [N_c+2,K,rows,cols].

    The pool unfolds k×k windows, a [offset, window] layout per shot, and reshapes it as [window, offset]: weight
    cell i averages entries 16i … 16i+15 of the unfolded layout (for k = 4), which are 16 consecutive windows at one
    in-window offset, not window i. So the weights the code trains with are a scrambled copy of the regions.
    """
    levels, shots, height, _ = regions.masks.shape
    kernel = height // grid[0]
    unfolded = F.unfold(1.0 + boost * regions.masks.float(), kernel_size=kernel, stride=kernel)  # [P, K·k², L]
    return unfolded.reshape(levels, shots, -1, kernel * kernel).mean(dim=-1).reshape(levels, shots, *grid)
