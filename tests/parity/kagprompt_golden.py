"""Golden numbers for KAG-prompt's ``variant: code`` from the authors' own head (CVL-hub/KAG-prompt).

Runs the authors' modules (``MMCI``, ``LinearLayer``, ``Adapter`` from ``code/model/AnomalyGPT_models.py``,
``CoattentionModel`` from ``code/model/siamese_model_conf_gnn.py`` with ``ConvGRU2.py``, ``FocalLoss`` and
``BinaryDiceLoss`` from ``code/utils/loss.py``), their training ``forward`` (deleted from ``code/model/openllama.py``
in commit f7d19a9, read here from ``f7d19a9^``) and their test-time ``extract_multimodal_feature`` (head
``openllama.py``) plus the top-k score of ``code/test_mvtec.py`` on small random token tensors, on the CPU in fp32,
and stores every stage with the exact parameters in ``tests/fixtures/parity/kagprompt/``.

Nothing of the authors' code is copied: their files are read from the checkout given on the command line. The only
changes made to them at load time are the hard-coded sizes, so the fixtures stay small: the channel width 1024 →
``CHANNELS``, the 16×16 grid → ``GRID`` (and 256 → GRID²), the ImageBind token width 1280 → ``WIDTH``, the map side
224 → ``SCORE_SIZE``, and ``.cuda()`` becomes a no-op. The ImageBind trunk and text tower are replaced by the random
tokens, CLS embeddings and text features stored in the fixture (the head never sees anything else).

    python tests/parity/kagprompt_golden.py --authors /path/to/KAG-prompt --out tests/fixtures/parity/kagprompt
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CHANNELS, GRID, WIDTH, SCORE_SIZE = 64, 8, 48, 32
BATCH, SHOTS, LAYERS, TOP_K, GAMMA = 2, 2, 4, 30, 0.1
SEED = 0
TRAINING_FORWARD_COMMIT = "f7d19a9"  # the commit that deleted the training forward from openllama.py
SIZE_CONSTANTS = {1024: CHANNELS, 16: GRID, 256: GRID * GRID, 1280: WIDTH, 224: SCORE_SIZE}


class ResizeConstants(ast.NodeTransformer):
    """Replace the authors' hard-coded integer sizes (and nothing else) by the small fixture sizes."""

    def visit_Constant(self, node: ast.Constant) -> ast.Constant:
        if type(node.value) is int and node.value in SIZE_CONSTANTS:
            return ast.copy_location(ast.Constant(SIZE_CONSTANTS[node.value]), node)
        return node


def load_source(source: str, namespace: dict, drop_relative_imports: bool = True) -> dict:
    """Execute a module's source with the size constants replaced, in ``namespace``."""
    tree = ResizeConstants().visit(ast.parse(source))
    if drop_relative_imports:
        tree.body = [n for n in tree.body if not (isinstance(n, ast.ImportFrom) and n.level > 0)]
    exec(compile(ast.fix_missing_locations(tree), "<authors>", "exec"), namespace)  # noqa: S102
    return namespace


def method_source(source: str, class_name: str, method: str) -> str:
    """The source of one method of one class, dedented to module level."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == method:
                    return ast.unparse(item)
    raise LookupError(f"{class_name}.{method} not found")


def git_show(repo: Path, spec: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "show", spec], check=True, capture_output=True, text=True).stdout


def authors_modules(repo: Path) -> dict:
    """Load the authors' head classes and their two forward passes with the fixture sizes."""
    code = repo / "code"
    base = {"torch": torch, "nn": nn, "F": F, "np": np}
    gru = load_source((code / "model/ConvGRU2.py").read_text(), dict(base, __name__="ConvGRU2"))
    gru_module = types.SimpleNamespace(**gru)
    gnn = load_source((code / "model/siamese_model_conf_gnn.py").read_text(), dict(base, ConvGRU=gru_module))
    heads = load_source((code / "model/AnomalyGPT_models.py").read_text(), dict(base))
    losses = load_source((code / "utils/loss.py").read_text(), dict(base))
    deleted = git_show(repo, f"{TRAINING_FORWARD_COMMIT}^:code/model/openllama.py")
    head = (code / "model/openllama.py").read_text()
    glue = dict(base, CLASS_NAMES=["bottle"])
    load_source(method_source(deleted, "OpenLLAMAPEFTModel", "forward"), glue)
    load_source(method_source(head, "OpenLLAMAPEFTModel", "extract_multimodal_feature"), glue)
    return {"gnn": gnn, "heads": heads, "losses": losses, "glue": glue}


class AuthorsHead(nn.Module):
    """The parameter-holding part of the authors' ``OpenLLAMAPEFTModel``, with the same attribute names."""

    def __init__(self, modules: dict) -> None:
        super().__init__()
        self.image_decoder = modules["heads"]["LinearLayer"](WIDTH, CHANNELS, LAYERS)
        self.adapter = modules["heads"]["Adapter"](CHANNELS, CHANNELS)
        self.aGNN = modules["gnn"]["CoattentionModel"](CHANNELS, GRID)
        self.mmci = modules["heads"]["MMCI"](CHANNELS, CHANNELS)
        self.loss_focal = modules["losses"]["FocalLoss"]()
        self.loss_dice = modules["losses"]["BinaryDiceLoss"]()
        self.device = "cpu"


def with_cls(cls_tokens: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """ImageBind's sequence-first layout [N+1,B,W] with a CLS row, which ``LinearLayer`` drops."""
    return torch.cat([cls_tokens[:, None], patches], dim=1).transpose(0, 1)


def generate(authors_repo: Path, out_dir: Path) -> None:
    """Run the authors' head at a fixed seed and write ``golden.npz`` and ``meta.json`` into ``out_dir``."""
    authors_repo, out_dir = Path(authors_repo), Path(out_dir)
    modules = authors_modules(authors_repo)
    glue = modules["glue"]
    torch.manual_seed(SEED)
    head = AuthorsHead(modules)
    parameters = {f"param/{k}": v.detach().clone() for k, v in head.state_dict().items()}
    n = GRID * GRID
    query_taps = torch.randn(LAYERS, BATCH, n, WIDTH)
    query_cls_tokens = torch.randn(LAYERS, BATCH, WIDTH)  # dropped by LinearLayer; present for the layout only
    query_embed = torch.randn(BATCH, CHANNELS)  # the backbone's projected CLS embedding
    support_taps = torch.randn(LAYERS, SHOTS, n, WIDTH)
    text = F.normalize(torch.randn(BATCH, 2, CHANNELS), dim=-1)  # [normal, abnormal] per sample
    masks = torch.zeros(BATCH, 1, SCORE_SIZE, SCORE_SIZE)
    masks[1, 0, 8:20, 10:24] = torch.linspace(0.0, 1.0, 14)  # a ramp: the authors binarise it at 0.3
    labels_unused = None  # the authors derive the image label from the mask
    del labels_unused

    stages: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_module, _inputs, output) -> None:
            stages[name] = torch.stack(list(output)).detach().clone()  # [L,B,C,h,w]

        return hook

    focal_inputs: list[torch.Tensor] = []
    focal_values: list[torch.Tensor] = []
    dice_values: list[torch.Tensor] = []

    def record_focal(_module, inputs, output) -> None:
        focal_inputs.append(inputs[0].detach().clone())
        focal_values.append(output.detach())

    def record_dice(_module, _inputs, output) -> None:
        dice_values.append(output.detach())

    handles = [
        head.mmci.register_forward_hook(keep("multi_kernel")),
        head.aGNN.register_forward_hook(keep("graph")),
        head.loss_focal.register_forward_hook(record_focal),
        head.loss_dice.register_forward_hook(record_dice),
    ]
    original_cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # the authors allocate their outputs with .cuda()
    try:
        # ---- training forward (BatchNorm in training mode, the authors' per-node calls)
        head.train()
        taps_in = [with_cls(query_cls_tokens[i], query_taps[i]) for i in range(LAYERS)]
        agent = types.SimpleNamespace(
            **{k: getattr(head, k) for k in ("image_decoder", "adapter", "aGNN", "mmci", "loss_focal", "loss_dice")},
            device="cpu",
            visual_encoder=None,  # only handed to the text stub
            encode_image_from_tensor=lambda _images: (head.adapter(query_embed), head.image_decoder(list(taps_in))),
        )
        glue["encode_text_with_prompt_ensemble"] = lambda _model, _names, _device: text
        loss, _accuracy = glue["forward"](agent, {"images": [None] * BATCH, "class_names": ["bottle"] * BATCH,
                                                  "masks": list(masks.clone())})  # fmt: skip
        train = {
            "train/multi_kernel": stages.pop("multi_kernel"),
            "train/graph": stages.pop("graph"),
            "train/layer_maps": torch.stack([m[:, 1] for m in focal_inputs], dim=1),  # [B,8,S,S]
            "train/focal_sum": torch.stack(focal_values).sum(),
            "train/dice_sum": torch.stack(dice_values).sum(),
            "train/loss": loss.detach(),
            "train/bn_running_mean": head.aGNN.bn1.running_mean.clone(),
            "train/bn_running_var": head.aGNN.bn1.running_var.clone(),
        }
        # ---- test-time forward, one query at a time as the authors (BatchNorm with its running statistics)
        head.eval()
        evaluation: dict[str, list[torch.Tensor]] = {k: [] for k in ("multi_kernel", "graph", "textual", "fused")}
        evaluation["score"], evaluation["similarity"] = [], []
        with torch.no_grad():
            for b in range(BATCH):
                glue["encode_text_with_prompt_ensemble"] = lambda _m, _n, _d, b=b: text[b : b + 1]

                def encode(_paths, b=b):
                    taps_b = [with_cls(query_cls_tokens[i, b : b + 1], query_taps[i, b : b + 1]) for i in range(LAYERS)]
                    return head.adapter(query_embed[b : b + 1]), head.image_decoder(taps_b)

                def one_shot(paths, b=b):
                    source = query_taps[:, b : b + 1] if paths == ["query"] else support_taps
                    return [source[i].clone() for i in range(LAYERS)], None

                agent.encode_image, agent.encode_image_for_one_shot = encode, one_shot
                textual, _ = glue["extract_multimodal_feature"](
                    agent, {"image_paths": ["query"], "prompt": "bottle", "normal_img_paths": [], "r": GAMMA}, False
                )
                evaluation["multi_kernel"].append(stages.pop("multi_kernel"))
                evaluation["graph"].append(stages.pop("graph"))
                fused, similarity = glue["extract_multimodal_feature"](
                    agent, {"image_paths": ["query"], "prompt": "bottle", "normal_img_paths": ["support"], "r": GAMMA},
                    False,
                )  # fmt: skip
                stages.clear()
                flat = fused.reshape(-1).numpy()
                top = flat[np.argpartition(-flat, TOP_K)[:TOP_K]]  # test_mvtec.py's top-k
                evaluation["textual"].append(textual.reshape(SCORE_SIZE, SCORE_SIZE))
                evaluation["fused"].append(fused.reshape(SCORE_SIZE, SCORE_SIZE))
                evaluation["similarity"].append(similarity.reshape(()))
                evaluation["score"].append(torch.tensor(0.1 * float(similarity) + 0.9 * float(np.mean(top))))
    finally:
        torch.Tensor.cuda = original_cuda
        for handle in handles:
            handle.remove()
    arrays = {
        **parameters, **train,
        "eval/multi_kernel": torch.cat(evaluation["multi_kernel"], dim=1),
        "eval/graph": torch.cat(evaluation["graph"], dim=1),
        **{f"eval/{k}": torch.stack(evaluation[k]) for k in ("textual", "fused", "similarity", "score")},
        "input/query_taps": query_taps, "input/query_embed": query_embed, "input/support_taps": support_taps,
        "input/text": text, "input/masks": masks[:, 0],
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / "golden.npz", **{k: v.numpy().astype(np.float32) for k, v in arrays.items()})
    commit = subprocess.run(["git", "-C", str(authors_repo), "rev-parse", "HEAD"], check=True, capture_output=True,
                            text=True).stdout.strip()  # fmt: skip
    meta = {
        "authors_repository": "https://github.com/CVL-hub/KAG-prompt", "authors_commit": commit,
        "training_forward_from": f"{TRAINING_FORWARD_COMMIT}^:code/model/openllama.py",
        "channels": CHANNELS, "grid": GRID, "width": WIDTH, "score_size": SCORE_SIZE, "batch": BATCH,
        "shots": SHOTS, "layers": LAYERS, "top_k": TOP_K, "gamma": GAMMA, "seed": SEED,
        "replaced_constants": {str(k): v for k, v in SIZE_CONSTANTS.items()}, "torch": torch.__version__,
    }  # fmt: skip
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--authors", type=Path, required=True, help="a git checkout of CVL-hub/KAG-prompt")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "fixtures/parity/kagprompt")
    args = parser.parse_args()
    generate(args.authors, args.out)


if __name__ == "__main__":
    main()
