"""Rollout service: the student samples completions with its current weights (N replicas)."""
