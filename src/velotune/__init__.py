"""velotune: fast, memory-lean fine-tuning of open LLMs."""
