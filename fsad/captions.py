"""``fsad captions validate|show``: check MFSC caption records and show the prompts MLLP builds from them."""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning_modules.finegrainedad.mfsc import CaptionRecordError, load_record, mllp_texts, packaged_record


def validate(targets: list[str]) -> int:
    """Print OK or the error (file and field) for every record file under the targets; 1 if any fails."""
    files: list[Path] = []
    for target in map(Path, targets):
        if target.is_dir():
            files += sorted(target.rglob("*.json"))
        elif target.is_file():
            files.append(target)
        else:
            print(f"FAIL {target}: no such file or folder")
            return 1
    failures = 0
    for path in files:
        try:
            load_record(path)
            print(f"OK   {path}")
        except CaptionRecordError as err:
            failures += 1
            print(f"FAIL {err}")
    print(f"{len(files) - failures} valid, {failures} invalid")
    return 1 if failures or not files else 0


def show(dataset: str | None, category: str | None, file: str | None, seed: int) -> int:
    """Print every level's prompt bodies (normal / handcrafted abnormal / learnable abnormal)."""
    try:
        record = load_record(file) if file else packaged_record(dataset or "", category or "")
    except CaptionRecordError as err:
        print(f"error: {err}")
        return 1
    for name, group in mllp_texts(record, seed=seed).groups().items():
        print(f"[{name}]")
        for kind, bodies in (("NHP", group.normal), ("AHP", group.abnormal), ("ALP", group.learnable_abnormal)):
            for body in bodies:
                prefix = "N N N N A" if kind == "ALP" else "N N N N"
                print(f"  {kind}  {prefix} {body}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fsad captions", description="MFSC caption records for FineGrainedAD.")
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("validate", help="check records against the schema")
    check.add_argument("targets", nargs="+", help="record files or folders")
    view = sub.add_parser("show", help="print the prompts MLLP builds from a record")
    view.add_argument("dataset", nargs="?", help="packaged record: dataset (mvtec, visa, realiad, synthetic)")
    view.add_argument("category", nargs="?", help="packaged record: category")
    view.add_argument("--file", help="a record file instead of a packaged one")
    view.add_argument("--seed", type=int, default=0, help="seed of the random choices in the prompts")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "validate":
        return validate(args.targets)
    return show(args.dataset, args.category, args.file, args.seed)
