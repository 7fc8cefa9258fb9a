"""Errors that mean "the user gave us something we cannot use": the CLI prints them as one line."""


class DuetError(Exception):
    """Base of user-facing errors (bad path, bad config, bad dataset row, ...)."""


class ModelLoadError(DuetError):
    """A model or tokenizer could not be found or loaded."""


class DataError(DuetError):
    """A dataset source or row is unusable; the message names the file/row and field."""
