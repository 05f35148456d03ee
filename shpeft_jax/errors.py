"""Errors raised for bad user input. Each message names the problem and the fix."""


class ShpeftError(ValueError):
  """Base class of the project's user-facing errors."""


class ConfigError(ShpeftError):
  """An invalid or inconsistent configuration value."""


class DataError(ShpeftError):
  """Missing, misplaced, corrupt or empty data."""


class CheckpointError(ShpeftError):
  """A checkpoint that is missing, corrupt or belongs to another model."""
