"""The typed error model: every error a user can fix is a :class:`MetrankError`.

The command line prints a ``MetrankError`` as one line and exits with status 2; the HTTP service answers it with a
4xx status. Any other exception is a bug in metrank or in the caller's code and keeps its traceback. Every class
derives from ``ValueError`` (``MissingFileError`` also from ``FileNotFoundError``), so ``except ValueError`` in
existing user code keeps working.
"""

from __future__ import annotations


class MetrankError(ValueError):
    """Base class: the message says what is wrong and what to do."""


class InputError(MetrankError):
    """Bad input data or arguments: a wrong shape, dtype, value, or an unknown option."""


class ConfigError(MetrankError):
    """A bad configuration: an unknown name, a misspelt key, options that do not fit together."""


class StateError(MetrankError):
    """The object or the files on disk are not in a state that allows the call (damaged, untrained, closed)."""


class NotFoundError(InputError):
    """A referenced item (an id, a name) does not exist; the HTTP service answers 404."""


class MissingFileError(MetrankError, FileNotFoundError):
    """A file or folder the call needs does not exist."""
