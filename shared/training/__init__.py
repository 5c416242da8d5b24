"""Plain training and evaluation functions for the conversion model, used by central and federated training."""
