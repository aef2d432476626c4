"""Backends that export pruned models (installed as graphprune.backends)."""

__all__: list[str] = []
