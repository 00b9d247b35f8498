"""Errors the engine raises for problems a user can fix.

Every message names the offending field or thing and says what to change.
"""


class CharLoraError(Exception):
    """A problem with the user's input, model or environment (not a bug)."""


class ConfigError(CharLoraError, ValueError):
    """An invalid training setting; ``field`` names it."""

    def __init__(self, field, message):
        super().__init__(f"{field}: {message}")
        self.field = field


class UnsupportedModelError(CharLoraError):
    """The loaded model is of a kind this trainer cannot train."""


class OutputExistsError(CharLoraError, FileExistsError):
    """The output file exists and overwrite was not requested."""


class MissingPackageError(CharLoraError, ImportError):
    """An optional feature needs a package that is not installed."""
