"""The one error type raised for invalid configuration or invalid user input.

Messages always name the offending key (dotted path) or file, and what would be accepted.
"""


class ConfigError(ValueError):
    """A configuration key, value or input file is invalid; the message says which and why."""
