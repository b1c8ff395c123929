"""``python -m datasync.api [--output DIR] [--check]``: write (or verify) the CRD YAML files.

``--check`` writes nothing and exits 1 with a diff when the files differ from the models, for CI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from datasync.api.generating import COMMAND, GenerationError, drift, write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description="Generate the DataSync CRDs from the pydantic models.")
    parser.add_argument("--output", "-o", type=Path, default=Path("crds"), help="directory of the CRD files (default: crds)")
    parser.add_argument("--check", action="store_true", help="only verify that the files are up to date")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = drift(args.output)
            for problem in problems:
                print(problem, file=sys.stderr)
            if problems:
                print(f"CRDs in {args.output} are out of date: run `{COMMAND} --output {args.output}`", file=sys.stderr)
                return 1
            print(f"CRDs in {args.output} are up to date")
            return 0
        for path in write(args.output):
            print(f"wrote {path}")
    except GenerationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
