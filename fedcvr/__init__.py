"""fedcvr: federated, privacy-preserving conversion-rate optimisation for e-commerce."""

__version__ = "0.1.0"
