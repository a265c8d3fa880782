"""How a peer process (one system, one measurement) reports back to the benchmark that started it:
one tagged JSON line on stdout, read by `common.run_peer`, and a failure as that line's `outcome`
rather than a traceback, so the parent still writes the row.

Standard library only: a peer imports Unsloth before anything else (it patches transformers and
torch), and this module may be imported ahead of it.
"""
from __future__ import annotations

import json
import os
import sys
from typing import NoReturn


def failure(exc: BaseException) -> str:
    """The `outcome` for an exception that ended a measurement: "GPU OOM (...)" for torch's
    out-of-memory error, else its type and the first line of its message."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    if type(exc).__name__ == "OutOfMemoryError":
        return f"GPU OOM ({first[:120]})"
    return f"{type(exc).__name__}: {first[:200]}"


def emit(tag: str, result: dict) -> NoReturn:
    """Print `TAG {json}` and end the process at once: the line is out, so nothing waits on
    compile workers or other threads a peer left behind."""
    print(f"{tag} {json.dumps(result)}", flush=True)
    sys.stderr.flush()
    os._exit(0)
