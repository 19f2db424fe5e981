"""Errors that are the user's to fix: the CLI prints their message on one line and exits with 2."""


class UserError(Exception):
    """A mistake in the user's input (a path, an option, a config); the message says what and where."""


class ConfigError(UserError):
    """A config file that does not match its schema: names the key and the file."""
