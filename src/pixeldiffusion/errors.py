"""Errors a user can cause and fix. The CLI prints their message alone, without a traceback."""


class PixelDiffusionError(Exception):
    """Base class: the message is one sentence that names the problem and the fix."""


class ConfigError(PixelDiffusionError, ValueError):
    """An unknown config key, a value of the wrong type or out of its range."""


class DataError(PixelDiffusionError):
    """A data set that is missing, unreadable, or cannot be downloaded."""


class CheckpointError(PixelDiffusionError):
    """A checkpoint path that does not exist, is not a checkpoint, or does not fit the model."""
