"""Token-level conventions shared by data, losses and metrics."""

IGNORE_INDEX = -100
"""A label with no target (prompt tokens, padding): Hugging Face's and DeepSpeed's convention."""
