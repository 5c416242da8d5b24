"""Errors of model configuration and loading; each names the setting, the value and the fix."""


from ..settings import SettingsError


class ModelConfigError(SettingsError):
    """A model or training setting is invalid."""
