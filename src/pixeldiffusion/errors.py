"""Errors a user can cause and fix. The CLI prints their message alone, without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PixelDiffusionError(Exception):
    """Base class: the message is one sentence that names the problem and the fix."""


class ConfigError(PixelDiffusionError, ValueError):
    """An unknown config key, a value of the wrong type or out of its range."""


class DataError(PixelDiffusionError):
    """A data set that is missing, unreadable, or cannot be downloaded."""


class CheckpointError(PixelDiffusionError):
    """A checkpoint path that does not exist, is not a checkpoint, or does not fit the model."""


def did_you_mean(name: object, choices: Iterable[object]) -> str:
    """The hint for a misspelt ``name``: "did you mean 'x'? " for the closest of ``choices``
    (difflib's ratio at least 0.6), or "" when none is close. Messages put it before the list of
    valid values: f"unknown sampler 'dim'; {did_you_mean(...)}valid: ..."."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f"did you mean '{close[0]}'? " if close else ""
