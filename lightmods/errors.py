"""Errors that stop a run early with a message a user can act on."""


class ConfigError(ValueError):
    """A config value is unknown, of the wrong type, out of range, or incompatible with another choice."""


class DataError(ValueError):
    """A data file or generated dataset does not have the expected structure."""


def config_error(key: str, value, accepted: str) -> ConfigError:
    """Build the one error format every config check uses: key, offending value, what is accepted."""
    return ConfigError(f"{key}={value!r} is not accepted; accepted: {accepted}")
