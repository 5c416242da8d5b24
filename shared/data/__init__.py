"""The e-commerce data contract: loading, validating, summarising and turning events into examples."""
