"""Hub ids ("org/name"): download the safetensors, config and tokenizer files when online."""
from __future__ import annotations

from pathlib import Path

from velotune.errors import LoadError

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]


def download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LoadError(f"{repo_id}: not a local path, and loading by Hub id needs huggingface_hub "
                        "(pip install huggingface_hub)") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=ALLOW_PATTERNS))
    except Exception as exc:  # offline, unknown repo, gated repo: all end the same way for the user
        raise LoadError(f"{repo_id}: not a local path, and the Hub download failed "
                        f"({type(exc).__name__}: {exc}). Check the name and network, or pass a local folder.") from None
