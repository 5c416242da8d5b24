"""Code that both the coordinator (server) and the merchant nodes (client) use."""
