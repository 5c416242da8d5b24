"""Importers that turn public data sets into the fedcvr data contract."""
