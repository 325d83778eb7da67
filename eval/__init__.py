"""Evaluation of students and teachers on (vocabulary-sharded) logits."""
