"""Errors that sspo reports to users as one clear message (the CLI prints them without a traceback)."""


class SSPOError(Exception):
    """A problem with the user's input: the message names what is wrong and how to fix it."""


class ConfigError(SSPOError):
    """A config key is unknown, missing or out of range."""


class DataError(SSPOError):
    """A dataset file, folder or column is missing or unreadable."""


class ModelError(SSPOError):
    """A model path or hub id cannot be loaded."""


class TrainingError(SSPOError):
    """Training cannot go on (a non-finite loss, a failed save, a damaged saved state); earlier output is intact."""
