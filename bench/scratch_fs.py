"""A freshly made filesystem for one server's turn in a bench.

Files deleted on the same filesystem in the last minutes make every new file
slower to create (ext4 without a journal skips recently freed inodes one by
one): a bench run in /var/tmp right after another is measured on a slower disk
than the one before it, and the server that runs second pays for the first.
Each turn on its own new ext4 image (mkfs.ext4's defaults, journal included, as
an installed server has it) makes the turns alike and the runs repeatable.
Needs root, mkfs.ext4 and loop devices; `available()` says whether they are here.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from typing import Iterator, Optional

from common import which


def available() -> Optional[str]:
    """None if fresh filesystems can be made here; otherwise why not."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("mkfs.ext4", "mount", "umount"):
        if which(tool) is None:
            return "no %s" % tool
    if not os.path.exists("/dev/loop-control"):     # a container without them: mount would fail mid-bench
        return "no loop devices (/dev/loop-control)"
    return None


def add_option(parser: argparse.ArgumentParser, what: str) -> None:
    """A bench's --fresh-fs / --no-fresh-fs; `what` says what goes on the new filesystem."""
    parser.add_argument("--fresh-fs", action=argparse.BooleanOptionalAction, default=None,
                        help="%s (default: on when root with mkfs.ext4 and no --base)" % what)


def settle_option(parser: argparse.ArgumentParser, args: argparse.Namespace, kept: bool = False) -> None:
    """--fresh-fs as given, or its default: on where fresh filesystems can be made, unless
    --base names a directory or the scratch directory is `kept` (they are not kept)."""
    why_not = available() or ("its filesystems are not kept (--keep)" if kept else None)
    if args.fresh_fs is None:
        args.fresh_fs = why_not is None and not args.base
    elif args.fresh_fs and why_not:
        parser.error("--fresh-fs: %s" % why_not)


def size_for(messages: int, size: int) -> int:
    """Bytes enough for `messages` twice over (an inode and a block each, plus the text)."""
    per_message = size + 8192
    return max(256 << 20, 3 * messages * per_message)


def inodes_for(messages: int) -> int:
    """Inodes enough for `messages` twice over in Exim's spool (-D, -H and msglog:
    three files a message), with room to spare: mkfs's one per 16 KiB falls short of that
    from about 10,000 messages of 10 KB."""
    return 8 * messages + 4096


@contextlib.contextmanager
def fresh_ext4(parent: str, size: int, inodes: Optional[int] = None) -> Iterator[str]:
    """A new ext4 filesystem of `size` bytes (a sparse image in `parent`), mounted for the block.
    `-T default`: 4 KiB blocks as on a server's disk, where mkfs would otherwise pick 1 KiB
    ones for an image under 512 MiB and small runs would measure another filesystem."""
    fd, image = tempfile.mkstemp(prefix="bench-fs-", suffix=".img", dir=parent)
    mountpoint = tempfile.mkdtemp(prefix="bench-fs-", dir=parent)
    try:
        os.ftruncate(fd, size)
        os.close(fd)
        fd = -1
        subprocess.run([which("mkfs.ext4") or "mkfs.ext4", "-q", "-F", "-T", "default"]
                       + (["-N", str(inodes)] if inodes else []) + [image], check=True,
                       stdout=subprocess.DEVNULL, timeout=120)
        subprocess.run([which("mount") or "mount", "-o", "loop", image, mountpoint], check=True,
                       timeout=60)
        yield mountpoint
    finally:
        with _no_interrupt():
            if fd >= 0:
                os.close(fd)
            # asked, not remembered: a Ctrl-C while mount(8) runs can leave it mounted
            if os.path.ismount(mountpoint):
                _unmount(mountpoint)
            with contextlib.suppress(OSError):
                os.rmdir(mountpoint)
            with contextlib.suppress(OSError):
                os.unlink(image)


@contextlib.contextmanager
def _no_interrupt() -> Iterator[None]:
    """Ctrl-C held off (in umount too, which inherits the ignored signal) while a mount is
    taken down: a second one there would leave the mount, its loop device and its image."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _unmount(mountpoint: str) -> None:
    """umount, retried while the last server's processes let go; lazily as a last resort."""
    umount = which("umount") or "umount"
    for _ in range(50):
        if subprocess.run([umount, mountpoint], stderr=subprocess.DEVNULL, timeout=60).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run([umount, "-l", mountpoint], timeout=60)
