"""What the data command lines share: user errors as one line and an exit code, atomic outputs."""

import contextlib
import os
import shutil
import sys
import tempfile


class DataError(Exception):
    """A problem with the user's input (file, line, field, flag): reported as one line, no traceback."""


def run_cli(main, argv=None) -> int:
    """Run ``main(argv)``; a :class:`DataError` prints ``error: ...`` on stderr and exits with 2."""
    try:
        main(argv)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


@contextlib.contextmanager
def atomic_directory(final_dir: str):
    """Yield a temporary directory beside ``final_dir`` that replaces it only if the block succeeds.

    A crash or an error leaves any previous ``final_dir`` untouched and no half-written output.
    """
    final_dir = os.path.abspath(final_dir)
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(final_dir)}.tmp-", dir=parent)
    try:
        yield staging
        if os.path.isdir(final_dir):
            # Swap through a second name so that final_dir never holds a mix of old and new files.
            retired = tempfile.mkdtemp(prefix=f".{os.path.basename(final_dir)}.old-", dir=parent)
            os.rename(final_dir, os.path.join(retired, "old"))
            os.rename(staging, final_dir)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(staging, final_dir)
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging, ignore_errors=True)


def require_files(paths, what="input") -> None:
    """Every path must be an existing, non-empty file."""
    for path in paths:
        if not os.path.isfile(path):
            raise DataError(f"{what} file not found: {path}")
        if os.path.getsize(path) == 0:
            raise DataError(f"{what} file is empty: {path}")
