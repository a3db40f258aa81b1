"""User-facing errors. Each message names the file (and line or field) and says what was expected."""


class LmforgeError(Exception):
    """An error caused by the user's input; the CLI prints it on one line and exits non-zero."""


class ConfigError(LmforgeError):
    """A config (config.json, adapter config, CLI option) is invalid or unsupported."""


class CheckpointError(LmforgeError):
    """A weight file is missing, corrupt, or does not fit the model it is loaded into."""


class DataError(LmforgeError):
    """An input data file is missing, empty or has a bad row."""


class NonFiniteError(LmforgeError):
    """Training produced a NaN or infinite loss, gradient norm or weight; names the step and the last
    good checkpoint (nothing non-finite is ever saved over it)."""
