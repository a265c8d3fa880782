"""The one error type of the export package: raised before any file is written whenever the
request cannot be honoured (unknown target or quant type, unsupported architecture, missing run
folder, unrecognised chat template), naming the offending value and what is supported."""
from __future__ import annotations


class ExportError(ValueError):
    """An export that cannot be done; the message names the input and the supported choices."""
