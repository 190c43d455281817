"""Error types: every failure a user can cause raises a DalleMiniError with a message that says what to do."""


class DalleMiniError(Exception):
    """Base class of all errors the package raises on bad input; the CLI prints it and exits 2."""


class ConfigError(DalleMiniError):
    """A configuration value is missing, out of range or not supported."""


class CheckpointError(DalleMiniError):
    """A checkpoint file is missing, truncated, of a foreign format, or does not match its config."""


class InputError(DalleMiniError):
    """A prompt, image or sampling setting given by the user is invalid."""
