"""Next-basket evaluation of purchase logs: tasks at a date cut, ranking metrics, and the classic baselines."""

BASELINES = ("popularity", "repeat", "item-knn", "als", "text")
"""The classic baselines (`baselines.py`), in the order tables show them."""
