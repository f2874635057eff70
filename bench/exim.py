"""Exim as the other MTA of the intake bench: its daemon on loopback, accepting into its own spool.

SPEC §9 sets odmrd's intake against Exim 4.99 *in the same run*, because a shared VM's
disk and CPU vary more from hour to hour than the two servers differ. The bench starts
an Exim binary the operator built (see README.md) with a configuration it writes into
its scratch directory: nothing is delivered (queue_only), nothing is looked up (no
reverse DNS, no ident), and Exim's spool writes stay as in production.

What Exim does for durability (4.99.1 source, receive.c and spool_out.c), all before
its `250 OK id=...`: fflush + fsync of the -D data file, fdatasync of it again, the -H
header file written under a temporary name, fsync'd, renamed, and the input/ directory
fsync'd (NEED_SYNC_DIRECTORY on Linux). odmrd's §5/§7 promise is the same: data and
directory entry durable before the 250.
"""
from __future__ import annotations

import os
import pwd
import subprocess
import textwrap
import time
from typing import Optional, Tuple

from common import free_port, stop_process, wait_port

CONFIG = """\
# Written by bench/bench_intake.py: intake only, nothing is ever delivered.
primary_hostname = exim.bench
spool_directory = {spool}
log_file_path = {logs}/%slog
local_interfaces = 127.0.0.1
keep_environment =
domainlist bench_domains = {domains}
acl_smtp_rcpt = check_rcpt
queue_only = true
host_lookup =
helo_lookup_domains =
rfc1413_hosts =
rfc1413_query_timeout = 0s
smtp_accept_max = 100
smtp_accept_max_per_connection = 0
message_size_limit = 50M

begin acl
check_rcpt:
  accept hosts = 127.0.0.1
         domains = +bench_domains
  deny   message = relaying denied
"""


class Exim:
    """`exim -C conf -bdf -oX PORT` in a subprocess (root may use -C and keeps its
    privileges; -bdf rather than -bd so that the daemon stays our child)."""

    def __init__(self, binary: str, directory: str, domains: list):
        self.binary = binary
        self.dir = directory
        self.port = free_port()
        self.config = os.path.join(directory, "exim.conf")
        self.spool_dir = os.path.join(directory, "spool")
        self.log_path = os.path.join(directory, "exim.stderr")
        for path in (self.spool_dir, os.path.join(directory, "log")):
            os.makedirs(path)
        with open(self.config, "w") as fh:
            fh.write(CONFIG.format(spool=self.spool_dir, logs=os.path.join(directory, "log"),
                                   domains=" : ".join(domains)))
        self.proc: Optional[subprocess.Popen] = None

    def _exim_user(self) -> Tuple[int, int]:
        """The uid/gid Exim was built with (EXIM_USER): its receiving processes write as it."""
        out = subprocess.run([self.binary, "-C", self.config, "-bP", "exim_user"], check=True,
                             capture_output=True, text=True, timeout=30).stdout
        name = out.split("=", 1)[1].strip()
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid

    def start(self) -> "Exim":
        uid, gid = self._exim_user()
        for path in (self.dir, self.spool_dir, os.path.join(self.dir, "log")):
            os.chown(path, uid, gid)
        path = self.dir
        while path != os.path.dirname(path):            # the exim user must reach its spool
            mode = os.stat(path).st_mode
            if mode & 0o111 != 0o111:
                os.chmod(path, mode | 0o111)
            path = os.path.dirname(path)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.binary, "-C", self.config, "-bdf", "-oX", str(self.port)],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        wait_port(self.port, 20, "no Exim (see %s)" % self.log_path)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spooled(self) -> int:
        """Messages in Exim's queue: one -H file each, once the 250 is sent."""
        try:
            return sum(1 for n in os.listdir(os.path.join(self.spool_dir, "input")) if n.endswith("-H"))
        except FileNotFoundError:
            return 0

    def _wait_reaped(self, timeout: float = 5.0) -> None:
        """Until the daemon has no child left: a session's CPU counts once it is reaped."""
        deadline = time.monotonic() + timeout
        path = "/proc/%d/task/%d/children" % (self.pid, self.pid)
        while time.monotonic() < deadline:
            with open(path) as fh:
                if not fh.read().split():
                    return
            time.sleep(0.02)

    def cpu_seconds(self) -> Tuple[float, float]:
        """(user, system) CPU seconds of the daemon and of the per-connection processes
        it has reaped (cutime/cstime of /proc/PID/stat), once the last session is over."""
        self._wait_reaped()
        tick = os.sysconf("SC_CLK_TCK")
        with open("/proc/%d/stat" % self.pid) as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return ((int(fields[11]) + int(fields[13])) / tick, (int(fields[12]) + int(fields[14])) / tick)

    def stop(self) -> None:
        stop_process(self.proc, 20)
        if self.proc is not None:
            self._log.close()
        self.proc = None


def describe() -> str:
    return textwrap.fill("Exim: queue_only, no DNS or ident lookups; before each 250 it fsyncs the "
                         "-D data file and the -H header file, renames -H into place and fsyncs "
                         "the input/ directory (4.99.1 receive.c, spool_out.c).", 88,
                         initial_indent="  ", subsequent_indent="  ")
