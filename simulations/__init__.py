"""Researchers' entry points: the synthetic marketplace and experiment configurations."""
