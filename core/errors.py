"""One error taxonomy for every entry point.

:class:`UserError` and its kinds are problems with what the user gave (a config key, an input file,
a checkpoint on disk): the entry point prints ``error: <message>`` on one line and exits with 2,
without a traceback. :class:`TrainingStopped` means the job ran but cannot go on: exit 3.
Anything else is a bug and keeps its traceback.
"""

EXIT_USER_ERROR = 2
EXIT_TRAINING_STOPPED = 3


class UserError(Exception):
    """A problem with the user's input, reported as one line naming the key, file or value."""


class ConfigError(UserError, ValueError):
    """A bad run config: an unknown key, a wrong type or value, a model or tokenizer that cannot load."""


class DataError(UserError):
    """A problem with input data (file, line, field, flag)."""


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed: incomplete, damaged, of another run or layout."""


class TrainingStopped(RuntimeError):
    """The job cannot go on (e.g. too many consecutive non-finite steps); the message says why."""
