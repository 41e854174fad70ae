"""Golden numbers for APRIL-GAN from the authors' own scripts (ByChelsea/VAND-APRIL-GAN).

Runs, from the checkout given, the authors' ``test.py::test`` (zero-shot and few-shot mode) and one epoch of
``train.py::train`` with their vendored open_clip fork, ``LinearLayer``, prompt ensemble, ``FocalLoss``,
``BinaryDiceLoss`` and dataset class, on the CPU in fp32, on real MVTec bottle images (a good and a broken_large test
image; two train/good images as the support pool), and stores what their code computed in
``tests/fixtures/parity/aprilgan/``. Nothing of theirs is copied: their files are executed from the checkout.

How it runs here without changing what is computed:
- the architecture is ``fixtures/parity/fsad-parity.json`` (12 vision blocks, which their vision tower needs: it
  reads the attention of block 12), registered in their fork under the name ``ViT-fsad-parity`` (their code picks the
  ViT branch by the substring ``ViT``); weights are filled by parameter name (``weights.py``), as on the fsad side;
- their vision tower moves an unused attention sum to ``'cuda'``; ``Tensor.to('cuda')`` is a no-op while they run;
- their normal-image masks are ``Image.fromarray(np.zeros(...), mode='L')`` on a float64 array, which Pillow ≥ 11
  refuses; such all-zero arrays are handed over as uint8 (what older Pillow read from them: an all-black mask);
- in ``train.py`` the line ``patch_tokens[layer] /= patch_tokens[layer].norm(...)`` becomes the out-of-place
  ``x = x / x.norm(...)`` (identical values): under their CUDA autocast the norm reads an fp32 copy of the fp16
  tokens, so the in-place division never touches a tensor autograd saved; in fp32 on the CPU it does, and backward
  fails;
- ``skimage`` and ``tabulate`` (only the AUPRO metric and the printed table) are stubbed when not installed, and
  their ``cal_pro_score`` returns 0: no fixture depends on them;
- train uses ``aug_rate: -1`` (their test setting; the 4-image mosaic augmentation draws random files), batch 2 and
  one epoch, so exactly one optimiser step on the two test images.

Wrapped calls record their inputs and outputs: ``encode_image`` (preprocessed images, CLS, tapped tokens), the prompt
ensemble's text features, the per-layer ``torch.softmax`` maps, the final map of every image (the argument of their
visualisation ``normalize``), the arguments of ``roc_auc_score`` (masks and image scores), the losses and the
adapter gradients at the optimiser step.

    python tests/parity/make_golden.py aprilgan --authors /path/to/VAND-APRIL-GAN --data /path/to/mvtec_ad
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.parity.weights import fill_by_name

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "parity"
ARCH = "ViT-fsad-parity"
IMAGE_SIZE = 96
TAPS = [3, 6, 9, 12]
TEST_IMAGES = [("good", "000.png"), ("broken_large", "000.png")]
SUPPORT_POOL = ["000.png", "001.png"]
K_SHOT = 2
SEED = 0


def load_package(name: str, folder: Path) -> types.ModuleType:
    """Import the authors' vendored ``open_clip`` under another name, beside the installed one."""
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


IN_PLACE_NORMALISATION = "patch_tokens[layer] /= patch_tokens[layer].norm(dim=-1, keepdim=True)"
OUT_OF_PLACE_NORMALISATION = (
    "patch_tokens[layer] = patch_tokens[layer] / patch_tokens[layer].norm(dim=-1, keepdim=True)"
)


def load_script(path: Path, namespace: dict, out_of_place: bool = False) -> dict:
    """Execute one of their scripts (not its ``__main__`` block) in ``namespace``; ``out_of_place`` rewrites their
    in-place token normalisation (the same values; see the module docstring)."""
    source = path.read_text()
    if out_of_place:
        if source.count(IN_PLACE_NORMALISATION) != 1:
            raise LookupError(f"{path}: the token normalisation line was not found once")
        source = source.replace(IN_PLACE_NORMALISATION, OUT_OF_PLACE_NORMALISATION)
    exec(compile(source, str(path), "exec"), namespace)  # noqa: S102
    return namespace


def stub_missing(name: str, **attributes) -> None:
    """A placeholder module for an import their metrics need but no fixture uses."""
    try:
        importlib.import_module(name)
    except ImportError:
        sys.modules[name] = types.SimpleNamespace(**attributes)


def dataset_root(mvtec: Path, folder: Path) -> Path:
    """Their dataset layout: ``meta.json`` over a link to the real bottle folder."""
    folder.mkdir(parents=True)
    (folder / "bottle").symlink_to(mvtec / "bottle")

    def entry(split: str, defect: str, name: str) -> dict:
        anomalous = defect != "good"
        return {"img_path": f"bottle/{split}/{defect}/{name}", "cls_name": "bottle", "specie_name": defect,
                "mask_path": f"bottle/ground_truth/{defect}/{name[:3]}_mask.png" if anomalous else "",
                "anomaly": int(anomalous)}  # fmt: skip

    meta = {"train": {"bottle": [entry("train", "good", n) for n in SUPPORT_POOL]},
            "test": {"bottle": [entry("test", d, n) for d, n in TEST_IMAGES]}}  # fmt: skip
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


class Recorder:
    """Wraps the authors' calls and keeps what they return."""

    def __init__(self) -> None:
        self.calls: dict[str, list] = {}

    def add(self, key: str, value) -> None:
        self.calls.setdefault(key, []).append(value)

    def take(self) -> dict[str, list]:
        calls, self.calls = self.calls, {}
        return calls


def generate(authors_repo: Path, mvtec: Path, out_dir: Path) -> None:
    """Run the authors' test (zero- and few-shot) and one training step; write ``golden.npz`` and ``meta.json``."""
    authors_repo, out_dir = Path(authors_repo).resolve(), Path(out_dir)
    work = Path(tempfile.mkdtemp(prefix="aprilgan_golden_"))
    configs = work / "configs"
    configs.mkdir()
    shutil.copy(FIXTURES / "fsad-parity.json", configs / f"{ARCH}.json")
    authors_clip = load_package("open_clip", authors_repo / "open_clip")  # their scripts `import open_clip`
    authors_clip.add_model_config(configs)
    stub_missing("skimage", measure=None)
    stub_missing("tabulate", tabulate=lambda *a, **k: "")
    sys.path.insert(0, str(authors_repo))  # their scripts import dataset, model, loss, few_shot, prompt_ensemble
    record = Recorder()

    create = authors_clip.create_model_and_transforms

    def create_filled(*args, **kwargs):
        model, train_transform, preprocess = create(*args, **kwargs)
        fill_by_name(model, SEED)
        model.float().eval()
        encode = model.encode_image

        def encode_image(image, out_layers, normalize=False):
            pooled, tokens = encode(image, out_layers, normalize)
            record.add("images", image.detach().clone())
            record.add("cls", pooled.detach().clone())
            record.add("taps", torch.stack([t.detach().clone() for t in tokens], dim=1))  # [B,L,1+N,W]
            return pooled, tokens

        model.encode_image = encode_image
        return model, train_transform, preprocess

    authors_clip.create_model_and_transforms = create_filled
    softmax = torch.softmax

    def recorded_softmax(x, dim, *args, **kwargs):
        out = softmax(x, dim, *args, **kwargs)
        if x.dim() == 4 and dim == 1:
            record.add("layer_probabilities", out.detach().clone())
        return out

    to = torch.Tensor.to
    from_array = Image.fromarray

    def from_array_old_pillow(array, mode=None, *args, **kwargs):
        if mode == "L" and isinstance(array, np.ndarray) and array.dtype != np.uint8 and not array.any():
            array = array.astype(np.uint8)
        return from_array(array, mode, *args, **kwargs)

    def to_cpu_for_cuda(self, *args, **kwargs):
        if args and args[0] == "cuda" and not torch.cuda.is_available():
            return self
        return to(self, *args, **kwargs)

    common = dict(model=ARCH, pretrained=None, features_list=TAPS, image_size=IMAGE_SIZE, dataset="mvtec",
                  config_path=str(configs / f"{ARCH}.json"))  # fmt: skip
    data_root = dataset_root(Path(mvtec).resolve(), work / "data")
    torch.Tensor.to, torch.softmax, Image.fromarray = to_cpu_for_cuda, recorded_softmax, from_array_old_pillow
    try:
        # ---------------------------------------------------------------- one training step (train.py)
        train_ns = load_script(authors_repo / "train.py", {"__name__": "authors_train"}, out_of_place=True)
        trainer_state: dict[str, list] = {"initial": [], "grads": []}

        class RecordingAdam(torch.optim.Adam):
            def __init__(self, params, *args, **kwargs):
                params = list(params)
                trainer_state["initial"] = [p.detach().clone() for p in params]
                super().__init__(params, *args, **kwargs)

            def step(self, closure=None):
                trainer_state["grads"] = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
                return super().step(closure)

        train_ns["torch"] = types.SimpleNamespace(
            **{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")}
        )
        train_ns["torch"].optim = types.SimpleNamespace(Adam=RecordingAdam)
        losses = {"focal": [], "dice": [], "targets": []}
        focal_cls, dice_cls = train_ns["FocalLoss"], train_ns["BinaryDiceLoss"]

        class Focal(focal_cls):
            def forward(self, logit, target):
                value = super().forward(logit, target)
                losses["focal"].append(value.detach())
                losses["targets"].append(target.detach().clone())
                return value

        class Dice(dice_cls):
            def forward(self, input, targets):
                value = super().forward(input, targets)
                losses["dice"].append(value.detach())
                return value

        train_ns["FocalLoss"], train_ns["BinaryDiceLoss"] = Focal, Dice
        train_ns["setup_seed"](111)
        train_args = argparse.Namespace(**common, train_data_path=str(data_root), save_path=str(work / "train"),
                                        epoch=1, learning_rate=1e-3, batch_size=2, aug_rate=-1.0, print_freq=1,
                                        save_freq=1)  # fmt: skip
        train_ns["train"](train_args)
        train_calls = record.take()
        record.take()
        text_encoder = train_ns["encode_text_with_prompt_ensemble"]

        # ---------------------------------------------------------------- test.py, zero- then few-shot
        adapters = {f"fc.{i}.{kind}": p for i in range(len(TAPS)) for kind, p in
                    zip(("weight", "bias"), trainer_state["initial"][2 * i : 2 * i + 2], strict=True)}  # fmt: skip
        torch.manual_seed(SEED)
        for name, value in adapters.items():  # trained-looking adapters: the initial ones plus noise
            adapters[name] = value + 0.05 * torch.randn_like(value)
        checkpoint = work / "adapters.pth"
        torch.save({"trainable_linearlayer": adapters}, checkpoint)
        runs = {}
        for mode in ("zero_shot", "few_shot"):
            test_ns = load_script(authors_repo / "test.py", {"__name__": "authors_test"})
            text_features: list[torch.Tensor] = []

            def encode_text(*args, text_features=text_features, **kwargs):
                prompts = text_encoder(*args, **kwargs)
                text_features.append(prompts["bottle"].detach().clone())
                return prompts

            auroc = test_ns["roc_auc_score"]

            def recorded_auroc(y_true, y_score, *args, auroc=auroc, **kwargs):
                record.add("auroc_inputs", (np.asarray(y_true).copy(), np.asarray(y_score).copy()))
                return auroc(y_true, y_score, *args, **kwargs)

            normalize = test_ns["normalize"]

            def recorded_normalize(pred, *args, normalize=normalize, **kwargs):
                if not args and not kwargs:
                    record.add("final_map", np.asarray(pred).copy())
                return normalize(pred, *args, **kwargs)

            test_ns.update(encode_text_with_prompt_ensemble=encode_text, roc_auc_score=recorded_auroc,
                           normalize=recorded_normalize, cal_pro_score=lambda *a, **k: 0.0)  # fmt: skip
            args = argparse.Namespace(**common, data_path=str(data_root), save_path=str(work / mode),
                                      checkpoint_path=str(checkpoint), few_shot_features=TAPS, mode=mode,
                                      k_shot=K_SHOT, seed=10)  # fmt: skip
            test_ns["setup_seed"](args.seed)
            test_ns["test"](args)
            runs[mode] = record.take() | {"text": text_features}
            if mode == "few_shot":
                runs[mode]["support_paths"] = (work / mode / "k_shot.txt").read_text().split()
    finally:
        torch.Tensor.to, torch.softmax, Image.fromarray = to, softmax, from_array
        sys.path.remove(str(authors_repo))

    zero, few = runs["zero_shot"], runs["few_shot"]
    queries = len(TEST_IMAGES)
    arrays = {
        "text": zero["text"][0].T,  # [2,D]: normal, anomalous
        "query_images": torch.cat(zero["images"]),
        "query_cls": torch.cat(zero["cls"]),
        "query_taps": torch.cat(zero["taps"])[:, :, 1:],  # [B,L,N,W] without CLS
        "support_images": torch.cat(few["images"][:K_SHOT]),
        "support_taps": torch.cat(few["taps"][:K_SHOT])[:, :, 1:],
        "layer_probabilities": torch.stack(
            [torch.cat(zero["layer_probabilities"][i * len(TAPS) : (i + 1) * len(TAPS)])[:, 1] for i in range(queries)]
        ),  # [B,L,S,S], anomalous (normal = 1 − it)  # fmt: skip
        "zero_shot_map": np.stack(zero["final_map"]),  # [B,S,S]: Σ_l p_l
        "few_shot_map": np.stack(few["final_map"]),  # Σ_l p_l + Σ_l (1 − cos_l)
        "gt_mask": zero["auroc_inputs"][0][0].reshape(queries, IMAGE_SIZE, IMAGE_SIZE),
        "labels": zero["auroc_inputs"][1][0],
        "zero_shot_score": zero["auroc_inputs"][1][1],  # the CLS text probability
        "few_shot_score": few["auroc_inputs"][1][1],  # ½(text + min-max over the test set of the map max)
        "train/images": torch.cat(train_calls["images"]),
        "train/target": losses["targets"][0],
        "train/focal_sum": torch.stack(losses["focal"]).sum(),
        "train/dice_sum": torch.stack(losses["dice"]).sum(),
    }
    for name, value in zip(adapters, trainer_state["initial"], strict=True):
        arrays[f"train/initial/{name}"] = value
    for name, value in zip(adapters, trainer_state["grads"], strict=True):
        arrays[f"train/grad/{name}"] = value
    arrays.update({f"adapters/{k}": v for k, v in adapters.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / "golden.npz", **{k: np.asarray(torch.as_tensor(v), dtype=np.float32)
                                                   for k, v in arrays.items()})  # fmt: skip
    commit = (authors_repo / ".git").exists() and subprocess.run(
        ["git", "-C", str(authors_repo), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    meta = {"authors_repo": "ByChelsea/VAND-APRIL-GAN", "commit": commit or None, "arch": ARCH,
            "image_size": IMAGE_SIZE, "taps": TAPS, "test_images": [f"{d}/{n}" for d, n in TEST_IMAGES],
            "support_paths": few["support_paths"], "seed": SEED, "torch": torch.__version__,
            "authors_parameter_names": sorted(n for n, _ in authors_clip.create_model(ARCH, IMAGE_SIZE).named_parameters())}  # fmt: skip
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    shutil.rmtree(work, ignore_errors=True)
