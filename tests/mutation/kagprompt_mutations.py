"""Mutation check of KAG-prompt's ``model.py``: each one-line mutation below must make a KAG unit test fail.

Every mutation is applied to a copy of the package in a temporary folder (the real file is never touched); the copy
is imported in place of the installed package, and the KAG unit tests (the paper-formula tests and the parity tests
against the authors' head) run against it with ``-x``. Worker processes each import torch once and run their share
of the mutations in-process, one fresh import of the copied package per mutation.

    python tests/mutation/kagprompt_mutations.py [--workers 2] [name ...]

prints one line per mutation and exits 1 when one survives (or no longer applies to the source).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL = "fsad/lightning_modules/kagprompt/model.py"  # in the copied tree
PACKAGES = {"fsad": "fsad", "callbacks": "fsad/callbacks", "datamodules": "fsad/datamodules",
            "lightning_modules": "fsad/lightning_modules"}  # fmt: skip
TESTS = ("tests/unit/test_kagprompt.py", "tests/unit/test_kagprompt_parity.py")
TEST_SUPPORT = ("pyproject.toml", "tests/__init__.py", "tests/conftest.py", "tests/unit/__init__.py",
                "tests/fixtures/parity/kagprompt")  # fmt: skip


@dataclass(frozen=True)
class Mutation:
    """Replace ``old`` (found exactly once in model.py; it may carry context lines) by ``new``."""

    name: str
    target: str  # the equation or loss term and the variant it breaks
    old: str
    new: str


MUTATIONS = (
    Mutation("eq1_no_norm", "Eq. 1 paper", "else self.norm(outs.sum(0))", "else outs.sum(0)"),
    Mutation("eq1_code_sum", "Eq. 1 code", "return outs.mean(0) if self.norm is None", "return outs.sum(0) if self.norm is None"),
    Mutation("eq1_align_corners", "Eq. 1 both", 'mode="bilinear", align_corners=True) for conv',
             'mode="bilinear", align_corners=False) for conv'),
    Mutation("projection_code_relu", "projection code", "nn.Sequential(nn.Linear(width, inner), nn.ReLU())",
             "nn.Sequential(nn.Linear(width, inner))"),
    Mutation("eq2_zero_start", "Eq. 2 both", "        state = start\n", "        state = torch.zeros_like(start)\n"),
    Mutation("eq3_no_residual", "Eq. 3 paper", "(attention @ pointwise(self.intra_value, state)) + state",
             "(attention @ pointwise(self.intra_value, state))"),
    Mutation("eq3_no_wc3", "Eq. 3 paper", "(attention @ pointwise(self.intra_value, state))", "(attention @ state)"),
    Mutation("eq4_sqrt_d_scale", "Eq. 4 both", "torch.softmax(logits, dim=-1) @ keys",
             "torch.softmax(logits / keys.shape[-1] ** 0.5, dim=-1) @ keys"),
    Mutation("eq4_code_no_wc", "Eq. 4 code", 'torch.einsum("binc,bijmc->bijnm", forward_query, keys)',
             'torch.einsum("binc,bijmc->bijnm", state, keys)'),
    Mutation("eq5_wc_not_transposed", "Eq. 5 paper", "reverse_query = state @ self.inter.weight",
             "reverse_query = forward_query"),
    Mutation("eq5_code_transposed", "Eq. 5 code", 'else "same")', 'else "transpose")'),
    Mutation("eq6_self_loop_is_state", "Eq. 6 paper", "self_loop = self.intra_message(state)", "self_loop = state"),
    Mutation("eq7_column_softmax", "Eq. 7 both", "torch.softmax(logits, dim=-1) @ keys",
             "torch.softmax(logits, dim=-2) @ keys"),
    Mutation("eq8_gate_per_pixel", "Eq. 8 paper", "logits = logits.mean(dim=-2, keepdim=True)", "logits = logits"),
    Mutation("eq8_code_gate_pooled", "Eq. 8 code", "return message * torch.sigmoid(logits)",
             "return message * torch.sigmoid(logits).mean(dim=-2, keepdim=True)"),
    Mutation("eq9_self_loop_ungated", "Eq. 9 paper", "self_loop = self.gated(self_loop) if self.gate_self_loop",
             "self_loop = self_loop if self.gate_self_loop"),
    Mutation("eq9_mean_of_messages", "Eq. 9 paper", "aggregate = messages.sum(2) + self_loop",
             "aggregate = messages.mean(2) + self_loop"),
    Mutation("eq9_code_message_order", "Eq. 9 code", "stacked = messages.permute(0, 1, 2, 4, 3)",
             "stacked = messages.flip(2).permute(0, 1, 2, 4, 3)"),
    Mutation("eq10_update_gate_swapped", "Eq. 10 both", "return (1 - z) * h + z * candidate",
             "return z * h + (1 - z) * candidate"),
    Mutation("eq10_no_reset_gate", "Eq. 10 both", "torch.cat([x, r * h], dim=1)", "torch.cat([x, h], dim=1)"),
    Mutation("eq11_no_residual", "Eq. 11 paper", "return nodes + to_maps(state).reshape(b, layers, d, h, w)",
             "return to_maps(state).reshape(b, layers, d, h, w)"),
    Mutation("eq11_code_no_input", "Eq. 11 code", "torch.cat([to_maps(state), to_maps(start)], dim=1)",
             "torch.cat([to_maps(state), to_maps(state)], dim=1)"),
    Mutation("eq12_upsample_before_softmax", "Eq. 12 paper",
             "probabilities = self.upsample(logits.softmax(dim=2).flatten(1, 2))",
             "probabilities = self.upsample(logits.flatten(1, 2)).unflatten(1, (m, 2)).softmax(dim=2).flatten(1, 2)"),
    Mutation("eq12_code_softmax_before_upsample", "Eq. 12 code",
             "probabilities = self.upsample(logits.flatten(0, 1)).softmax(dim=1)",
             "probabilities = self.upsample(logits.flatten(0, 1).softmax(dim=1))"),
    Mutation("eq12_no_text_scale", "Eq. 12 both", "logits = self.text_scale * torch.einsum", "logits = torch.einsum"),
    Mutation("eq12_sum_of_layers", "Eq. 12 both", "textual = layer_maps.mean(dim=1)", "textual = layer_maps.sum(dim=1)"),
    Mutation("up_align_corners", "Eq. 12-13 Up both", 'size=self.score_size, mode="bilinear", align_corners=True)',
             'size=self.score_size, mode="bilinear", align_corners=False)'),
    Mutation("eq13_mean_of_layers", "Eq. 13 paper", 'layers = len(self.taps) if self.visual_reduction == "sum" else 1',
             "layers = 1"),
    Mutation("eq13_half_distance", "Eq. 13 paper", "return self.upsample(2.0 * layers * grid)[:, 0]",
             "return self.upsample(layers * grid)[:, 0]"),
    Mutation("eq13_code_normal_column", "Eq. 13 code", "similarity], dim=1).softmax(dim=1)[:, 1]",
             "similarity], dim=1).softmax(dim=1)[:, 0]"),
    Mutation("eq14_gamma_swapped", "Eq. 14 both", "self.gamma * textual + (1 - self.gamma) * visual",
             "(1 - self.gamma) * textual + self.gamma * visual"),
    Mutation("eq15_unnormalised_fc", "Eq. 15 both", "adapted = F.normalize(self.image_head(cls), dim=-1)",
             "adapted = self.image_head(cls)"),
    Mutation("eq15_no_fc", "Eq. 15 both", "adapted = F.normalize(self.image_head(cls), dim=-1)",
             "adapted = F.normalize(cls, dim=-1)"),
    Mutation("eq16_max_not_top_k_mean", "Eq. 16 both", "(1 - gamma) * top.mean(dim=1)",
             "(1 - gamma) * top.max(dim=1).values"),
    Mutation("eq16_gamma_swapped", "Eq. 16 both", "return gamma * image_similarity + (1 - gamma) * top.mean(dim=1)",
             "return (1 - gamma) * image_similarity + gamma * top.mean(dim=1)"),
    Mutation("eq17_ce_on_normal_column", "Eq. 17 CE paper",
             'binary_cross_entropy_with_logits(outputs["image_logits"][:, 1]',
             'binary_cross_entropy_with_logits(outputs["image_logits"][:, 0]'),
    Mutation("eq17_code_image_softmax", "Eq. 17 image term code", "F.binary_cross_entropy(torch.sigmoid(outputs",
             "F.binary_cross_entropy(torch.softmax(outputs"),
    Mutation("eq17_focal_columns_swapped", "Eq. 17 focal paper", "torch.where(target > 0.5, abnormal, normal)",
             "torch.where(target > 0.5, normal, abnormal)"),
    Mutation("eq17_focal_no_exponent", "Eq. 17 focal paper",
             ".clamp(eps, 1.0)\n    return (-(1 - p_true).pow(gamma)", ".clamp(eps, 1.0)\n    return (-(1 - p_true).pow(1.0)"),
    Mutation("eq17_code_focal_no_smooth", "Eq. 17 focal code",
             "normal_weight * normal + abnormal_weight * abnormal + smooth", "normal_weight * normal + abnormal_weight * abnormal"),
    Mutation("r1_code_focal_one_column_clamped", "Eq. 17 focal code (R1)",
             "normal_weight = (1 - target).clamp(smooth, 1 - smooth)", "normal_weight = 1 - target.clamp(smooth, 1 - smooth)"),
    Mutation("eq17_no_dice_complement", "Eq. 17 dice both",
             "dice_loss(maps[:, m], target) + dice_loss(normal[:, m], 1 - target) for m",
             "dice_loss(maps[:, m], target) for m"),
    Mutation("eq17_focal_averaged_over_maps", "Eq. 17 focal both",
             "focal = sum(focal_fn(maps[:, m], normal[:, m], target, focal_gamma) for m in range(maps.shape[1]))",
             "focal = sum(focal_fn(maps[:, m], normal[:, m], target, focal_gamma) for m in range(maps.shape[1])) / maps.shape[1]"),
    Mutation("eq17_paper_dice_weight", "Eq. 17 λ₂ paper", '(1.0 if variant == "paper" else 0.3)',
             '(0.3 if variant == "paper" else 0.3)'),
    Mutation("eq17_code_dice_weight", "Eq. 17 λ₂ code", '(1.0 if variant == "paper" else 0.3)',
             '(1.0 if variant == "paper" else 1.0)'),
    Mutation("code_bn_per_batch", "Eq. 11 code (C3)", "for node in out.split(1)", "for node in [out]"),
)  # fmt: skip


def build_tree(root: Path) -> None:
    """Copy the package (laid out as installed: fsad/ with its three sub-packages) and the KAG tests under root."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for source, target in PACKAGES.items():
        shutil.copytree(REPO / source, root / target, ignore=ignore, dirs_exist_ok=True)
    for relative in (*TEST_SUPPORT, *TESTS):
        source, target = REPO / relative, root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=ignore)
        else:
            shutil.copy2(source, target)


def apply(mutation: Mutation, model: Path) -> None:
    source = model.read_text()
    count = source.count(mutation.old)
    if count != 1:
        raise LookupError(f"{mutation.name}: the line to mutate occurs {count} times in model.py (expected once)")
    model.write_text(source.replace(mutation.old, mutation.new))


def run_in_process(names: list[str]) -> int:
    """Worker: apply each named mutation to a fresh copy and run the KAG tests against it; print one line each."""
    import pytest

    by_name = {m.name: m for m in MUTATIONS}
    survived = 0
    with tempfile.TemporaryDirectory(prefix="kag-mutants-") as scratch:
        for name in names:
            mutation = by_name[name]
            root = Path(scratch) / name
            build_tree(root)
            try:
                apply(mutation, root / MODEL)
            except LookupError as err:
                print(f"STALE    {name}: {err}", flush=True)
                survived += 1
                continue
            for module in [m for m in sys.modules if m == "fsad" or m.startswith(("fsad.", "tests"))]:
                del sys.modules[module]
            sys.path.insert(0, str(root))
            try:
                code = pytest.main([*(str(root / t) for t in TESTS), "-x", "-q", "--no-header", "-p", "no:cacheprovider",
                                    "--rootdir", str(root), "-W", "ignore"])  # fmt: skip
            finally:
                sys.path.remove(str(root))
            verdict = "killed" if code == pytest.ExitCode.TESTS_FAILED else "SURVIVED"
            if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
                verdict = f"ERROR({int(code)})"
            survived += verdict != "killed"
            print(f"{verdict:8} {name} [{mutation.target}]", flush=True)
    return survived


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = args.names or [m.name for m in MUTATIONS]
    unknown = set(names) - {m.name for m in MUTATIONS}
    if unknown:
        parser.error(f"unknown mutations: {sorted(unknown)}")
    if args.worker:
        return int(run_in_process(names) > 0)
    shares = [names[i :: args.workers] for i in range(args.workers)]
    workers = [
        subprocess.Popen([sys.executable, __file__, "--worker", *share], stdout=subprocess.PIPE, text=True)
        for share in shares if share
    ]  # fmt: skip
    lines = []
    for worker in workers:
        out, _ = worker.communicate()
        lines += [line for line in out.splitlines() if line.startswith(("killed", "SURVIVED", "STALE", "ERROR"))]
    for line in sorted(lines, key=lambda line: line.split()[1]):
        print(line)
    failed = [line for line in lines if not line.startswith("killed")]
    print(f"{len(lines) - len(failed)}/{len(names)} mutations killed")
    return int(bool(failed) or len(lines) != len(names) or any(w.returncode not in (0, 1) for w in workers))


if __name__ == "__main__":
    sys.exit(main())
