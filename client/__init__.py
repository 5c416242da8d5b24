"""The merchant node: Flower ClientApp and what it needs."""
