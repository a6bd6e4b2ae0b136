"""Errors that tunelab reports to people.

Every error a user can cause (a wrong path, a malformed file, a bad option) is raised as a
`TunelabError` subclass whose message names the file, the line or field, and what is wrong. The CLI
prints these messages without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TunelabError(Exception):
    """Base class of errors caused by input, not by a bug."""


class CheckpointError(TunelabError):
    """A model directory or file is missing, malformed, truncated or of an unknown architecture."""


class TokenizerError(TunelabError):
    """A tokenizer file or chat template cannot be loaded or used."""


class ConfigError(TunelabError):
    """A config file or option is invalid."""


class DataError(TunelabError):
    """A data file is malformed: the message names the file, the line and the field."""


class FeedbackError(TunelabError):
    """A feedback store or feedback record is unusable: the message names the store or the file, line and field."""
