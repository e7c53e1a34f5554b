"""``orthonode phantom``: generate synthetic knee/ankle/shoulder MRI studies with ground truth."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from inference.labels import JOINTS

log = logging.getLogger(__name__)

_TRANSFER_SYNTAX_CHOICES = ("explicit", "jpeg2000", "jpegls", "rle")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``phantom`` arguments."""
    from training.phantoms.sites import site_names  # light: no numpy-heavy work at import

    parser.add_argument("--joint", required=True, choices=JOINTS, help="joint to image")
    parser.add_argument("--cases", required=True, type=_positive_int, help="number of cases (studies) to generate")
    parser.add_argument("--out", required=True, type=Path, help="output folder (cases.csv, <case_id>/dicom, masks)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files (default 0)")
    parser.add_argument(
        "--site", choices=site_names(), default=None,
        help="use this site profile for every case (to hold a site out); default: drawn per case",
    )
    parser.add_argument(
        "--transfer-syntax", choices=_TRANSFER_SYNTAX_CHOICES, default="explicit",
        help="explicit VR little endian, or lossless JPEG 2000 / JPEG-LS / RLE (default explicit)",
    )
    parser.add_argument("--preview", action="store_true", help="also write <case_id>/preview.png (three planes, mask, labels)")
    parser.add_argument("--matrix", type=_positive_int, default=256, help="in-plane acquisition matrix (default 256)")


def run(args: argparse.Namespace) -> int:
    """Generate the data set; returns the process exit status."""
    from training.phantoms.generate import generate_dataset

    if args.seed < 0:
        log.error("--seed must be >= 0, got %d", args.seed)
        return 2
    if not 32 <= args.matrix <= 1024:
        log.error("--matrix must be between 32 and 1024, got %d", args.matrix)
        return 2
    started = time.perf_counter()
    try:
        specs = generate_dataset(
            out=args.out, joint=args.joint, cases=args.cases, seed=args.seed, site=args.site,
            transfer_syntax=args.transfer_syntax, matrix=args.matrix, preview=args.preview,
        )
    except FileExistsError as exc:
        log.error("--out %s: %s", args.out, exc)
        return 1
    elapsed = time.perf_counter() - started
    print(f"wrote {len(specs)} {args.joint} case(s) to {args.out} in {elapsed:.1f} s")
    return 0
