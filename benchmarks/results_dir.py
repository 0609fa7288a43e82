"""Where a benchmark writes: a fresh, git-ignored folder per run unless asked otherwise.

Committed results under ``benchmarks/results/`` back the README's numbers, so a plain run must never overwrite
them: by default each run writes to ``benchmarks/results/local/<UTC date and time>-<name>/``. ``--out`` picks a
folder, and ``--save-results`` writes to ``benchmarks/results/`` itself, for a run meant to be committed.
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None,
                        help="folder to write results into (default: a new folder under benchmarks/results/local/)")
    parser.add_argument("--save-results", action="store_true",
                        help="write into benchmarks/results/ (the committed results the README cites)")


def output_dir(args: argparse.Namespace, name: str) -> Path:
    """The folder this run writes into, created: ``--out``, the committed folder, or a fresh local one."""
    if args.out is not None and args.save_results:
        raise SystemExit("--out and --save-results name two places: pass one of them")
    if args.out is not None:
        folder = Path(args.out)
    elif args.save_results:
        folder = RESULTS
    else:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H%M%S")
        folder = RESULTS / "local" / f"{stamp}-{name}"
        suffix = 1
        while folder.exists():  # two runs in the same second each get their own folder
            suffix += 1
            folder = RESULTS / "local" / f"{stamp}-{name}-{suffix}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
