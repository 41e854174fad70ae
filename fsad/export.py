"""``fsad export``: one self-contained model file for an inspection line, in ONNX and/or as a torch ExportedProgram.

The exported graph takes a uint8 RGB batch [B,3,H,W] of any size and does everything ``fsad test`` does after
reading the file: the anti-aliased bicubic resize of the datamodule (:func:`antialiased_resize`), the backbone
normalisation, one backbone pass, the method head, upsampling and smoothing to ``eval_size``. Outputs are
``anomaly_map`` float32 [B,E,E] and ``pred_score`` float32 [B] (the raw values ``fsad test`` scores), plus
``pred_label`` uint8 [B] and ``pred_mask`` uint8 [B,E,E] when image and pixel thresholds are fitted. Support
features, text features, thresholds and normalisation statistics are constants of the graph. ``metadata.json``
beside it says what went in (config hash, support files, thresholds and their source, backbone, fsad version).

ONNX goes through torch's dynamo exporter (opset 18), whose ``Resize`` carries the anti-aliasing filter. The torch
file is the same wrapper recorded by :func:`torch.export.export` (``model.pt2``, read back with
:func:`torch.export.load`). It holds only what inference runs: the computations no output needs (backbone blocks past
the last tap) and the tensors nothing reads (the CLIP text tower, whose features are constants by then) are taken
out, so it is about the size of the ONNX file.

The support set is the one the run evaluated (:func:`evaluated_support`): the run folder's ``support.txt``, else the
memory banks a checkpoint holds, else the datamodule's k-shot draw; ``--support`` replaces it and says so.

    fsad export -c <config> --ckpt_path <ckpt> [--support <dir>] [--format onnx|pt2|both] --out model/
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import lightning
import torch
from torch import nn
from torch.export.graph_signature import ExportGraphSignature, InputKind

from fsad.datamodules.kshot import read_support_list
from fsad.datamodules.transforms import PairedTransform, antialiased_resize
from fsad.errors import FsadError, OneLineArgumentParser
from fsad.lightning_modules.base import FewShotAnomalyModule
from fsad.lightning_modules.components.clip import BackboneSpec
from fsad.lightning_modules.components.memory_bank import BANK_PREFIX
from fsad.lightning_modules.components.run_settings import evaluation_change_line
from fsad.run_folder import fresh_directory, replace_directory

ExportFormat = Literal["onnx", "pt2", "both"]
ONNX_FILE = "model.onnx"
CHECKPOINT_FILE = "model.ckpt"
PROGRAM_FILE = "model.pt2"
METADATA_FILE = "metadata.json"
SUPPORT_LIST = "support.txt"
SUPPORT_KEY = "support_files"
"""The checkpoint key under which ``fsad export`` records the support images of the banks it saves."""
INPUT_NAME = "image"


class ExportError(FsadError, RuntimeError):
    """An export could not be written or read back (a missing file or field is named)."""


def fsad_version() -> str:
    try:
        return version("fsad")
    except PackageNotFoundError:
        return "unknown"


class DeployedDetector(nn.Module):
    """Pre-processing, model and decisions in one module: uint8 [B,3,H,W] → maps, scores (labels, masks).

    Args:
        module: a fitted :class:`FewShotAnomalyModule` (support features cached).
        mean, std: the per-channel normalisation the datamodule applied (the backbone's).
    """

    def __init__(self, module: FewShotAnomalyModule, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.module = module
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.with_label = module.thresholds.has_image
        self.with_mask = module.thresholds.has_pixel

    @property
    def output_names(self) -> list[str]:
        return ["anomaly_map", "pred_score"] + ["pred_label"] * self.with_label + ["pred_mask"] * self.with_mask

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 RGB [B,3,H,W] → the normalised [B,3,S,S] the datamodule yields (same resize, same arithmetic)."""
        resized = antialiased_resize(images.float(), self.module.image_size)
        return (resized / 255.0 - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        anomaly_map, pred_score = self.module(self.preprocess(images))
        outputs = [anomaly_map, pred_score]
        if self.with_label:
            outputs.append(self.module.thresholds.image_label(pred_score))
        if self.with_mask:
            outputs.append(self.module.thresholds.pixel_mask(anomaly_map))
        return tuple(outputs)


def example_input(image_size: int) -> torch.Tensor:
    """A uint8 batch of 2 non-square images, larger than the model input, to record the graph with."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (2, 3, image_size + 37, image_size + 61), dtype=torch.uint8, generator=generator)


def dynamic_dims() -> dict[int, torch.export.Dim]:
    """Batch, height and width are free in every exported graph."""
    return {0: torch.export.Dim("batch", min=1, max=4096), 2: torch.export.Dim("height", min=8, max=16384),
            3: torch.export.Dim("width", min=8, max=16384)}  # fmt: skip


def export_onnx(detector: DeployedDetector, path: Path) -> None:
    """Dynamo export, opset 18, with batch, height and width dynamic."""
    program = torch.onnx.export(
        detector,
        (example_input(detector.module.image_size),),
        dynamo=True,
        input_names=[INPUT_NAME],
        output_names=detector.output_names,
        dynamic_shapes={"images": dynamic_dims()},
        opset_version=18,
        verbose=False,
    )
    program.save(str(path))


PURE_IN_EVALUATION = (
    torch.ops.aten.scaled_dot_product_attention.default,
    torch.ops.aten._assert_tensor_metadata.default,
)
"""Ops that only compute a result in an evaluation graph, though the graph marks them impure (see below)."""


def record_program(detector: nn.Module) -> torch.export.ExportedProgram:
    """``torch.export`` of the wrapper on the example batch, batch, height and width dynamic."""
    example = (example_input(detector.module.image_size),)
    return torch.export.export(detector, example, dynamic_shapes={"images": dynamic_dims()}, strict=False)


def without_unread_tensors(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program without the computations whose results no output needs, and without the parameters, buffers and
    constants nothing reads any more.

    A recording keeps every tensor of the module (the CLIP text tower, whose features are constants of the graph by
    then) and every backbone block it ran, even past the last tap a method reads. Dead-code elimination alone keeps
    those blocks: their attention (``scaled_dot_product_attention``, tagged random for its dropout, which is 0 in
    evaluation) counts as impure, and their outputs are checked by dtype assertions (``_assert_tensor_metadata``) on
    the recording's own intermediate tensors. Both count as pure here, so unused results go.
    """
    graph_module = program.graph_module
    graph = graph_module.graph
    graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure() and node.target not in PURE_IN_EVALUATION)
    specs = program.graph_signature.input_specs
    unused = {node.name for node in graph.nodes if node.op == "placeholder" and not node.users}
    lifted = (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
    dropped = {spec.arg.name: spec.target for spec in specs if spec.kind in lifted and spec.arg.name in unused}
    for node in [n for n in graph.nodes if n.op == "placeholder" and n.name in dropped]:
        graph.erase_node(node)
    graph_module.recompile()
    signature = ExportGraphSignature(
        input_specs=[spec for spec in specs if spec.arg.name not in dropped],
        output_specs=program.graph_signature.output_specs,
    )
    return torch.export.ExportedProgram(
        root=graph_module,
        graph=graph,
        graph_signature=signature,
        state_dict={name: t for name, t in program.state_dict.items() if name not in dropped.values()},
        range_constraints=program.range_constraints,
        module_call_graph=program.module_call_graph,
        constants={name: t for name, t in program.constants.items() if name not in dropped.values()},
        verifiers=program.verifiers,
    )


def export_program(detector: DeployedDetector, path: Path) -> None:
    """``model.pt2``: the wrapper recorded by ``torch.export``, holding only what inference runs
    (:func:`without_unread_tensors`), without the recording batch."""
    program = without_unread_tensors(record_program(detector))
    program.example_inputs = None  # the recording batch is not needed to run the program
    torch.export.save(program, str(path))


def save_checkpoint(
    module: FewShotAnomalyModule,
    path: Path,
    data_hparams: dict[str, Any] | None = None,
    support_files: list[str] | None = None,
) -> None:
    """A Lightning-style checkpoint of the fitted module (support banks and the files they came from, thresholds; no
    backbone weights), readable with ``weights_only=True`` by ``fsad predict --ckpt_path``,
    :meth:`fsad.Inferencer.from_checkpoint` and ``fsad export`` (which keeps its banks)."""
    hparams = {
        key: asdict(value) if isinstance(value, BackboneSpec) else value for key, value in module.hparams.items()
    }
    hparams.setdefault("_class_path", f"{type(module).__module__}.{type(module).__qualname__}")
    checkpoint = {
        "state_dict": module.state_dict(),
        "pytorch-lightning_version": lightning.__version__,
        "hyper_parameters": hparams,
        "datamodule_hyper_parameters": dict(data_hparams or {}),
        SUPPORT_KEY: list(support_files or []),
    }
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)


def export_model(
    module: FewShotAnomalyModule,
    out_dir: str | Path,
    formats: ExportFormat = "both",
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    support_files: list[str] | None = None,
    config_hash: str | None = None,
    data_hparams: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write the model file(s) and ``metadata.json`` into ``out_dir``; return the paths written by kind.

    ``mean``/``std`` default to the backbone's; ``data_hparams`` (the datamodule's hyper-parameters) go into the
    checkpoint written beside the model, so it can be read back without the config. The module must have its support
    set fitted; prompt methods' text features are cached by one call before the graph is recorded.
    """
    if formats not in ("onnx", "pt2", "both"):
        raise ExportError(f"--format: {formats!r} is not one of onnx, pt2, both")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module = module.to("cpu").float().eval()
    mean = tuple(float(m) for m in (module.backbone.image_mean if mean is None else mean))
    std = tuple(float(s) for s in (module.backbone.image_std if std is None else std))
    detector = DeployedDetector(module, mean, std).eval()
    written: dict[str, Path] = {}
    with torch.no_grad():
        detector(example_input(module.image_size))  # prompt methods encode their texts on the first call: cache them
        if formats in ("onnx", "both"):
            written["onnx"] = out / ONNX_FILE
            export_onnx(detector, written["onnx"])
        if formats in ("pt2", "both"):
            written["pt2"] = out / PROGRAM_FILE
            export_program(detector, written["pt2"])
    metadata = {
        "fsad_version": fsad_version(),
        "method": f"{type(module).__module__}.{type(module).__qualname__}",
        "config_hash": config_hash,
        "support_files": list(support_files or []),
        "thresholds": module.thresholds.as_dict(),
        "backbone": asdict(module.backbone.spec),
        "image_size": module.image_size,
        "eval_size": module.eval_size,
        "gaussian_sigma": module.gaussian_sigma,
        "mean": list(mean),
        "std": list(std),
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "B,3,H,W RGB, any H and W"},
        "outputs": detector.output_names,
        "files": {kind: path.name for kind, path in written.items()},
    }
    written["checkpoint"] = out / CHECKPOINT_FILE
    save_checkpoint(module, written["checkpoint"], data_hparams, support_files)
    written["metadata"] = out / METADATA_FILE
    written["metadata"].write_text(json.dumps(metadata, indent=2) + "\n")
    return written


def read_metadata(model_dir: str | Path) -> dict[str, Any]:
    """``metadata.json`` of an export folder; a missing, unreadable or malformed file is one error naming it."""
    path = Path(model_dir) / METADATA_FILE
    if not path.is_file():
        raise ExportError(f"{path} not found: point at the folder `fsad export --out` wrote")
    try:
        metadata = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: not valid JSON ({type(err).__name__}); export the model again") from None
    if not isinstance(metadata, dict) or not isinstance(metadata.get("outputs"), list):
        raise ExportError(f"{path}: no `outputs` list; not the metadata `fsad export` writes")
    return metadata


@dataclass
class PreparedModel:
    """A module built from an fsad config, its checkpoint loaded and its support set fitted, ready to export."""

    module: FewShotAnomalyModule
    transform: PairedTransform
    support_files: list[str]
    held_out_normals: list[str]
    config_hash: str
    data_hparams: dict[str, Any]


@dataclass
class SupportChoice:
    """Which support images an export uses, and where that choice comes from (said in one printed line).

    ``refit`` is False when the module keeps the memory banks its checkpoint holds (``files`` then lists what the
    checkpoint recorded, possibly nothing)."""

    files: list[str]
    source: str
    refit: bool = True


def holds_support_features(checkpoint: dict[str, Any]) -> bool:
    """True when the checkpoint's state dict carries fitted memory banks (``fsad export``'s ``model.ckpt`` does)."""
    return any(f".{BANK_PREFIX}" in f".{key}" for key in checkpoint.get("state_dict", {}))


def recorded_support(ckpt_path: str | Path | None, checkpoint: dict[str, Any] | None) -> SupportChoice | None:
    """The support set a checkpoint itself points at: ``support.txt`` of its run folder (``<run>/checkpoints/x.ckpt``),
    else the memory banks it holds, else none at all when an export's ``model.ckpt`` is of a zero-shot run; None when
    it points at nothing (a fit checkpoint moved out of its run folder, or one pretrained on another dataset, whose
    run folder records no shots)."""
    if ckpt_path and Path(ckpt_path).parent.name == "checkpoints":
        recorded = Path(ckpt_path).parent.parent / SUPPORT_LIST
        if recorded.is_file():
            return SupportChoice(read_support_list(recorded), str(recorded))
    if checkpoint is not None and holds_support_features(checkpoint):
        return SupportChoice(list(checkpoint.get(SUPPORT_KEY) or []), f"the support features held by {ckpt_path}",
                             refit=False)  # fmt: skip
    if checkpoint is not None and checkpoint.get(SUPPORT_KEY) == [] and zero_shot_data(checkpoint):
        return SupportChoice([], f"the zero-shot model {ckpt_path} (data.k_shot: 0)")
    return None


def zero_shot_data(checkpoint: dict[str, Any]) -> bool:
    """Whether the checkpoint's datamodule had no support images (``data.k_shot: 0``)."""
    return (checkpoint.get("datamodule_hyper_parameters") or {}).get("k_shot") == 0


def evaluated_support(
    ckpt_path: str | None, checkpoint: dict[str, Any] | None, run_dir: Path, drawn: list[str]
) -> SupportChoice:
    """The support set the evaluated model used, in this order: what the checkpoint points at
    (:func:`recorded_support`), ``support.txt`` of the config's run folder, and the datamodule's k-shot draw (what
    ``fsad test`` of this config fits)."""
    choice = recorded_support(ckpt_path, checkpoint)
    if choice is not None:
        return choice
    recorded = run_dir / SUPPORT_LIST
    if recorded.is_file():
        return SupportChoice(read_support_list(recorded), str(recorded))
    return SupportChoice(list(drawn), "the datamodule's k-shot draw (data.k_shot, data.seed)")


def evaluated_shots(choice: SupportChoice) -> str:
    """``4 evaluated shot(s)``, or ``evaluated shots`` when a checkpoint's banks do not say how many."""
    return f"{len(choice.files)} evaluated shot(s)" if choice.files or choice.refit else "evaluated shots"


def replaced_support_line(replacement: SupportChoice, evaluated: SupportChoice) -> str:
    """``support: 67 image(s) from good/ replace the 4 evaluated shot(s) (runs/.../support.txt)``: the one line that
    says a model is built on other support images than the evaluated ones."""
    return (f"support: {len(replacement.files)} image(s) from {replacement.source} replace the "
            f"{evaluated_shots(evaluated)} ({evaluated.source})")  # fmt: skip


def prepare_from_config(
    configs: list[str], overrides: list[str], ckpt_path: str | None, support: str | None
) -> PreparedModel:
    """Instantiate model and data exactly as ``fsad test`` would (same seed), load ``ckpt_path`` and fit the support
    set: the evaluated one (:func:`evaluated_support`), or ``support`` (a folder or files) in its place, which is
    said in one line."""
    from fsad.calibration import images_from
    from fsad.checkpoints import read_checkpoint
    from fsad.cli import FsadCLI
    from fsad.inference import fit_support_images

    args = [part for config in configs for part in ("-c", config)] + list(overrides)
    cli = FsadCLI(args=args, run=False)
    module, data = cli.model, cli.datamodule
    if getattr(data, "resize", "antialias") != "antialias":
        raise ExportError(f"data.resize: {data.resize!r} cannot be exported exactly; export models run with antialias")
    checkpoint = read_checkpoint(ckpt_path, field="--ckpt_path") if ckpt_path else None
    if checkpoint is not None:  # refused on another class or trained structure; evaluation changes reported
        changes = module.check_checkpoint_settings(checkpoint, data, f"--ckpt_path {ckpt_path}")
        if changes:
            print(evaluation_change_line(changes, f"--ckpt_path {ckpt_path}"), file=sys.stderr)
    module.prepare_for_data(data)
    if checkpoint is not None:
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    data.setup("test")
    choice = evaluated_support(ckpt_path, checkpoint, cli.resolve_run_dir(), data.support_paths)
    if support:
        replacement = SupportChoice([str(p) for p in images_from(support)], str(support))
        print(replaced_support_line(replacement, choice))
        choice = replacement
    else:
        print(f"support: the {evaluated_shots(choice)} from {choice.source}")
    chosen = set(choice.files)
    held_out = [s.image_path for s in data.normal_pool if s.image_path not in chosen]
    transform = data.make_transform()
    if choice.refit:
        fit_support_images(module, choice.files, transform)
    data_hparams = {"_class_path": f"{type(data).__module__}.{type(data).__qualname__}", **dict(data.hparams)}
    return PreparedModel(module, transform, choice.files, held_out, module.run_config_hash, data_hparams)


def main(argv: list[str]) -> int:
    """``fsad export``: see the module docstring."""
    parser = OneLineArgumentParser(prog="fsad export", description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", action="append", required=True, help="fsad config(s), as for fsad test")
    parser.add_argument("--ckpt_path", default=None, help="checkpoint of the trained method (none: training-free)")
    parser.add_argument("--support", default=None, help="folder (or files) of normal reference images")
    parser.add_argument("--format", default="both", choices=["onnx", "pt2", "both"])
    parser.add_argument("--out", required=True, help="output folder (model.onnx, model.pt2, model.ckpt, metadata.json)")
    parser.add_argument("--val_normal_dir", default=None, help="labelled normal images for the thresholds")
    parser.add_argument("--val_abnormal_dir", default=None, help="labelled anomalous images for the thresholds")
    parser.add_argument("--val_mask_dir", default=None, help="masks of --val_abnormal_dir (x.png or x_mask.png)")
    parser.add_argument("--thresholds", default="auto", choices=["auto", "none"],
                        help="auto: F1 on labelled anomalies when given, else on NSA-synthesised ones; none: skip")  # fmt: skip
    parser.add_argument("--sensitivity", type=float, default=0.5, help="0..1; 0.5 keeps the F1 thresholds")
    args, overrides = parser.parse_known_args(argv)  # the rest are config overrides: --data.root ... --run_root ...
    from fsad.calibration import calibrate, images_from

    out = Path(args.out)
    staging = out.with_name(out.name + ".partial")  # an export that fails or is stopped publishes nothing
    try:
        prepared = prepare_from_config(args.config, overrides, args.ckpt_path, args.support)
        if args.thresholds == "auto":
            normals = images_from(args.val_normal_dir) if args.val_normal_dir else prepared.held_out_normals
            abnormals = images_from(args.val_abnormal_dir) if args.val_abnormal_dir else []
            values = calibrate(prepared.module, prepared.transform, normals or prepared.support_files, abnormals,
                               args.val_mask_dir)  # fmt: skip
            print(f"thresholds ({prepared.module.thresholds.source}): {values}")
        prepared.module.thresholds.set_sensitivity(args.sensitivity)
        written = export_model(
            prepared.module, fresh_directory(staging), args.format, prepared.transform.mean, prepared.transform.std,
            prepared.support_files, prepared.config_hash, prepared.data_hparams,
        )  # fmt: skip
        replace_directory(staging, out)
    except FsadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for kind, path in written.items():
        print(f"{kind}: {out / path.name} ({(out / path.name).stat().st_size / 1e6:.2f} MB)")
    return 0
