"""Errors of model configuration and loading; each names the setting, the value and the fix."""


class ModelConfigError(ValueError):
    """A model or training setting is invalid."""
