"""`velotune doctor [--output-dir DIR]`: what this machine has for training, and a fix for each
problem; exit status 1 when something blocks training (velotune/doctor.py says what is checked)."""
from __future__ import annotations

import argparse

from velotune.doctor import Check, collect, diagnose

MARKS = {"ok": "ok  ", "note": "note", "warn": "warn", "fail": "FAIL"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "doctor", help="check Python, torch, Triton, CUDA, GPU, disk, memory, llama.cpp and NCCL for training",
        description="Report what this machine offers for training and a fix for each problem; exit status 1 "
                    "when something blocks training.")
    p.add_argument("--output-dir", default="runs", metavar="DIR",
                   help="where checkpoints will be written, for the free-disk check (default: runs)")
    p.set_defaults(func=run)


def report(checks: list[Check]) -> tuple[list[str], int]:
    """The lines to print and the exit status."""
    lines = []
    for check in checks:
        lines.append(f"{MARKS[check.level]}  {check.what}")
        if check.fix and check.level != "ok":
            lines.append(f"      fix: {check.fix}")
    failures = sum(check.level == "fail" for check in checks)
    warnings = sum(check.level == "warn" for check in checks)
    if failures:
        lines.append(f"{failures} problem(s) block training.")
    else:
        lines.append("nothing blocks training" + (f" ({warnings} warning(s))." if warnings else "."))
    return lines, 1 if failures else 0


def run(args: argparse.Namespace) -> int:
    lines, status = report(diagnose(collect(args.output_dir)))
    print("\n".join(lines))
    return status
