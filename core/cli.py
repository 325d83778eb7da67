"""The one wrapper every entry point's ``main`` runs in: errors become a line and an exit code."""

import sys

from core.errors import EXIT_TRAINING_STOPPED, EXIT_USER_ERROR, TrainingStopped, UserError


def run_main(main, argv=None, *, user_errors=()) -> int:
    """``main(argv)``'s exit code (0 when it returns None). A :class:`UserError` (or one of
    ``user_errors``, exception types an entry point reports the same way) prints ``error: ...`` on
    stderr and gives 2; :class:`TrainingStopped` gives 3."""
    try:
        return main(argv) or 0
    except (UserError, *user_errors) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingStopped as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_TRAINING_STOPPED
