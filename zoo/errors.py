"""The errors zoo raises for bad input, and the small validators every layer uses to raise them.

Every layer may import this module; it imports nothing of zoo.
"""

from __future__ import annotations

from typing import Any, Callable


class ConfigError(ValueError):
    """A config key, value or combination that cannot be built; the message names the key."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit its model; the message names the file or tensors."""


def require_positive(config: Any, *names: str) -> None:
    """Raise ConfigError naming each of ``names`` (fields of ``config``) that is set and not > 0."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise ConfigError(f"{name} must be positive, got {value}")


def prefixed(path: str, check: Callable[..., None], *args) -> None:
    """Run ``check(*args)``; a ConfigError it raises is re-raised with ``path: `` in front."""
    try:
        check(*args)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
