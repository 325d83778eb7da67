"""Atomic outputs: a file or a directory is either the old one or the complete new one, never half."""

import contextlib
import hashlib
import os
import shutil
import tempfile


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and rename (then fsync the directory)."""
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@contextlib.contextmanager
def atomic_directory(final_dir: str, shared: bool = False):
    """Yield a temporary directory beside ``final_dir`` that replaces it only if the block succeeds.

    A crash or an error leaves any previous ``final_dir`` untouched and no half-written output.
    The directory is its owner's alone (``mkdtemp``'s 0o700) unless ``shared``, which gives it the
    permissions ``os.makedirs`` would (0o777 less the umask), for outputs others read (an exported
    model).
    """
    final_dir = os.path.abspath(final_dir)
    parent = os.path.dirname(final_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(final_dir)}.tmp-", dir=parent)
    try:
        if shared:
            umask = os.umask(0)  # the only way to read it is to set it
            os.umask(umask)
            os.chmod(staging, 0o777 & ~umask)
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


def sha256_of(*paths: str) -> str:
    """Hex sha256 of the files' bytes, one after another (read in 16 MiB blocks)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()
