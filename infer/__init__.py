"""Inference entry points: `python -m infer.generate`."""
