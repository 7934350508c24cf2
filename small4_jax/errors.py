"""Errors raised for bad input. Each message names the file, field or line and what was expected.

The command-line tools catch `Small4Error` and print its message without a traceback.
"""


class Small4Error(Exception):
    """Base class: a problem with the user's input, not a bug in small4-jax."""


class ConfigError(Small4Error):
    """A config file or field is missing, malformed or unsupported."""


class CheckpointError(Small4Error):
    """A checkpoint directory or file is missing, truncated, corrupt, or does not match the config."""


class TokenizerError(Small4Error):
    """A tokenizer file cannot be loaded, or text cannot be encoded."""


class InputError(Small4Error):
    """A request (prompt, ids, sampling settings) cannot be served."""


class OutputError(Small4Error):
    """Writing a result failed (a full disk, a vanished directory); the message says what is safe. The command-line
    tools exit with status 1 for it (2 is for bad input)."""
