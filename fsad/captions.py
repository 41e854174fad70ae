"""``fsad captions validate|show|generate|import``: check, inspect, generate and import MFSC caption records."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fsad.datamodules.mvtec import list_images
from fsad.errors import OneLineArgumentParser
from fsad.lightning_modules.components.prompts import render_slots
from fsad.lightning_modules.finegrainedad.caption_lint import lint_record
from fsad.lightning_modules.finegrainedad.mfsc import (
    CaptionRecordError,
    caption_provenance_summary,
    default_prompt_seed,
    load_record,
    mllp_texts,
    packaged_record,
)


def validate(targets: list[str]) -> int:
    """Print OK or every problem (file and field) of every record file under the targets: schema errors first,
    then the lint (:func:`lint_record`); 1 if any fails."""
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
            problems = [f"{path}: {problem}" for problem in lint_record(load_record(path))]
        except CaptionRecordError as err:
            problems = [str(err)]
        for problem in problems:
            print(f"FAIL {problem}")
        if problems:
            failures += 1
        else:
            print(f"OK   {path}")
    print(f"{len(files) - failures} valid, {failures} invalid")
    return 1 if failures or not files else 0


def show(dataset: str | None, category: str | None, file: str | None, seed: int | None, variant: str = "paper") -> int:
    """Print every level's prompts (normal / handcrafted abnormal / learnable abnormal) as ``variant`` builds them:
    ``N`` a shared normal context, ``A`` an abnormal context, ``<kind>`` a learnable placeholder."""
    try:
        record = load_record(file) if file else packaged_record(dataset or "", category or "")
    except CaptionRecordError as err:
        print(f"error: {err}")
        return 1
    print("[provenance]")
    for key, value in caption_provenance_summary(record).items():
        print(f"  {key}: {value}")
    seed = default_prompt_seed(variant) if seed is None else seed
    for name, group in mllp_texts(record, seed=seed, placeholders=variant == "paper").groups().items():
        print(f"[{name}]" + (" (Attr-MoE weights on its placeholders)" if group.gated else ""))
        for kind, bodies in (("NHP", group.normal), ("AHP", group.abnormal), ("ALP", group.learnable_abnormal)):
            for body in bodies:
                prefix = "N N N N A" if kind == "ALP" else "N N N N"
                print(f"  {kind}  {prefix} {render_slots(body)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(prog="fsad captions", description="MFSC caption records for FineGrainedAD.")
    sub = parser.add_subparsers(dest="action", required=True)
    check = sub.add_parser("validate", help="check records against the schema")
    check.add_argument("targets", nargs="+", help="record files or folders")
    view = sub.add_parser("show", help="print the prompts MLLP builds from a record")
    view.add_argument("dataset", nargs="?", help="packaged record: dataset (mvtec, visa, realiad, synthetic)")
    view.add_argument("category", nargs="?", help="packaged record: category")
    view.add_argument("--file", help="a record file instead of a packaged one")
    view.add_argument("--seed", type=int, default=None,
                      help="seed of the random choices in the prompts (default: 111 for --variant code, else 0)")  # fmt: skip
    view.add_argument("--variant", choices=["paper", "code"], default="paper", help="FineGrainedAD variant's prompts")
    bring = sub.add_parser("import", help="convert the FineGrainedAD authors' records file (parsed, never run)")
    bring.add_argument("--from", dest="source", required=True, help="path of fine_grained_prompts.py")
    bring.add_argument("--out", required=True, help="folder for <dataset>/<category>.json (use it as captions:)")
    bring.add_argument("--variable", help="records list to read (default: the newest fine_grained_normal_prompts_vN)")
    bring.add_argument("--dataset", help="dataset of every record (default: mvtec/visa by category name)")
    bring.add_argument("--cluster-maps", dest="cluster_maps",
                       help="their fixed region maps, datasets/cluster_gt/visa.py (default: found beside the records "
                            "file's repository, if there)")  # fmt: skip
    make = sub.add_parser("generate", help="describe normal images with a multimodal chat endpoint")
    make.add_argument("--images", nargs="+", required=True, help="image files or folders of normal images")
    make.add_argument("--category", required=True)
    make.add_argument("--out", required=True, help="record JSON to write (use it as model.init_args.captions)")
    make.add_argument("--dataset", default="custom")
    make.add_argument(
        "--base-url", help="OpenAI-compatible API base, e.g. http://localhost:8000/v1 (FSAD_LLM_BASE_URL)"
    )
    make.add_argument("--model", help="model name (FSAD_LLM_MODEL)")
    make.add_argument("--api-key-env", default="FSAD_LLM_API_KEY", help="environment variable holding the API key")
    make.add_argument("--timeout", type=float, default=60.0)
    make.add_argument("--http-retries", type=int, default=4, help="retries on 429/5xx/timeouts, with backoff")
    make.add_argument("--backoff", type=float, default=1.0, help="first backoff in seconds (doubles each retry)")
    make.add_argument("--max-attempts", type=int, default=3, help="answers to request until one validates")
    make.add_argument("--response-format", choices=["json_object", "none"], default="json_object")
    make.add_argument("--cache-dir", help="answer cache (default $FSAD_CACHE_DIR/captions or ~/.cache/fsad/captions)")
    return parser


def generate_command(args: argparse.Namespace) -> int:
    from fsad.caption_generator import CaptionGenerationError, EndpointConfig, generate

    images: list[Path] = []
    for item in map(Path, args.images):
        images += list_images(item) if item.is_dir() else [item]
    endpoint = EndpointConfig(
        base_url=args.base_url, model=args.model, api_key=os.environ.get(args.api_key_env), timeout=args.timeout,
        http_retries=args.http_retries, backoff=args.backoff, response_format=args.response_format,
    )  # fmt: skip
    try:
        result = generate(images, args.category, Path(args.out), endpoint, args.dataset,
                          Path(args.cache_dir) if args.cache_dir else None, args.max_attempts)  # fmt: skip
    except (CaptionGenerationError, CaptionRecordError) as err:
        print(f"error: {err}")
        return 1
    for conflict in result.conflicts:
        print(f"conflict: {conflict}")
    print(f"wrote {args.out} ({len(result.record.components)} components from {len(images)} images)")
    return 0


def import_command(args: argparse.Namespace) -> int:
    """Import, print every guessed or dropped field and every lint finding, then the files written."""
    from fsad.caption_import import CaptionImportError, import_authors_records

    try:
        maps = Path(args.cluster_maps) if args.cluster_maps else None
        result = import_authors_records(Path(args.source), Path(args.out), args.variable, args.dataset, maps)
    except (CaptionImportError, CaptionRecordError) as err:
        print(f"error: {err}")
        return 1
    for line in result.report:
        print(f"changed: {line}")
    for path, record in zip(result.written, result.records.values(), strict=True):
        for problem in lint_record(record):
            print(f"lint: {path}: {problem}")
    print(f"wrote {len(result.written)} records under {args.out}")
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.action == "validate":
        return validate(args.targets)
    if args.action == "generate":
        return generate_command(args)
    if args.action == "import":
        return import_command(args)
    return show(args.dataset, args.category, args.file, args.seed, args.variant)
