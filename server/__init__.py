"""The coordinator: Flower ServerApp and what it needs."""
