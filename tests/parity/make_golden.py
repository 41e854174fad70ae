"""Regenerate the parity fixtures from the authors' code: ``python tests/parity/make_golden.py <method> --authors PATH``.

``promptad``: a checkout of FuNz-0/PromptAD; ``kagprompt``: a checkout of CVL-hub/KAG-prompt; ``finegrainedad``: a
checkout of RetoFan233/FineGrainedAD; ``aprilgan``: a checkout of ByChelsea/VAND-APRIL-GAN. The authors' code is
read from the path given and run there; only numbers land in ``tests/fixtures/parity/<method>/``. See README.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("method", choices=["promptad", "kagprompt", "finegrainedad", "aprilgan"])
    parser.add_argument("--authors", type=Path, required=True, help="checkout of the authors' repository")
    parser.add_argument("--data", type=Path, default=None,
                        help="MVTec-AD root holding bottle/ (promptad, finegrainedad, aprilgan); for finegrainedad "
                             "--category hazelnut the hazelnut_toy root (default: shared/data/ next to the repo)")  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=None, help="fixture folder (default tests/fixtures/parity/<method>)"
    )
    parser.add_argument("--category", default="bottle", choices=["bottle", "hazelnut", "transistor"],
                        help="finegrainedad: the golden category (hazelnut: --data is the hazelnut_toy root)")  # fmt: skip
    args = parser.parse_args(argv)
    out = args.out or REPO / "tests" / "fixtures" / "parity" / args.method
    if args.data is None:
        folder = "hazelnut_toy" if args.category == "hazelnut" else "mvtec_ad"
        args.data = REPO.parent / "shared" / "data" / folder
    if args.method == "promptad":
        from tests.parity.promptad_golden import generate

        generate(args.authors, args.data, out)
    elif args.method == "aprilgan":
        from tests.parity.aprilgan_golden import generate

        generate(args.authors, args.data, out)
    elif args.method == "finegrainedad":
        from tests.parity.finegrainedad_golden import generate

        generate(args.authors, args.data, out, args.category)
    else:
        from tests.parity.kagprompt_golden import generate

        generate(args.authors, out)
    print(f"wrote {sorted(p.name for p in out.iterdir())} to {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # run as a script from anywhere: `tests.parity` must be importable
    sys.exit(main())
