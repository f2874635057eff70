"""A rename, link or new file becomes durable only once its directory is synced too;
the spool, the users file and fetch's mailboxes all need that one step."""
from __future__ import annotations

import os


def fsync_dir(path: str) -> None:
    """Make the entries just renamed, linked or created in directory `path` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
