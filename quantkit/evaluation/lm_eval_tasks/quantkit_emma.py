"""The documents of the lm-eval task in quantkit_emma.yaml (lm-eval imports this file by its path)."""

from quantkit.evaluation.harness import emma_chapters as documents

__all__ = ["documents"]
