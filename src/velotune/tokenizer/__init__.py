"""The tokenizer every velotune model carries: `Tokenizer` (built from a Hugging Face folder or a GGUF
file's metadata) and `ChatTemplateError` (a chat template that is missing or fails)."""
from velotune.tokenizer.chat_template import ChatTemplateError
from velotune.tokenizer.tokenizer import Tokenizer

__all__ = ["ChatTemplateError", "Tokenizer"]
