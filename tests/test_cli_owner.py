"""Root running `odmrd user|enqueue` for a daemon that runs as `user`: files stay usable by it."""
from __future__ import annotations

import os
import pwd
import tempfile

import pytest

from helpers import run_cli

pytestmark = [pytest.mark.skipif(os.geteuid() != 0, reason="needs root"), pytest.mark.slow]


@pytest.fixture
def nobody_setup():
    nobody = pwd.getpwnam("nobody")
    base = tempfile.mkdtemp(prefix="odmr-owner-", dir="/tmp")
    os.chmod(base, 0o711)
    spool = os.path.join(base, "spool")
    os.mkdir(spool, 0o700)
    os.chown(spool, nobody.pw_uid, nobody.pw_gid)
    conf = os.path.join(base, "odmrd.conf")
    with open(conf, "w") as fh:
        fh.write("user = nobody\nspool_dir = spool\nusers_file = users\n"
                 "[odmr]\nlisten = 127.0.0.1:1\n[smtp]\nlisten = 127.0.0.1:2\n")
    yield conf, base, nobody
    import shutil
    shutil.rmtree(base, ignore_errors=True)


def test_root_edits_keep_files_for_the_service_account(nobody_setup):
    conf, base, nobody = nobody_setup
    r = run_cli("-c", conf, "user", "add", "bob", "--domain", "example.net", "--password-stdin",
                input=b"pw-one\n")
    assert r.returncode == 0, r.stderr
    users = os.path.join(base, "users")
    st = os.stat(users)
    assert (st.st_uid, st.st_mode & 0o777) == (nobody.pw_uid, 0o600)
    r = run_cli("-c", conf, "user", "passwd", "bob", "--password-stdin", input=b"pw-two\n")
    assert r.returncode == 0, r.stderr
    assert os.stat(users).st_uid == nobody.pw_uid
    r = run_cli("-c", conf, "enqueue", "-f", "a@remote.test", "u@example.net",
                input=b"Subject: x\n\nhello\n")
    assert r.returncode == 0, r.stderr
    domain_dir = os.path.join(base, "spool", "example.net")
    assert os.stat(domain_dir).st_uid == nobody.pw_uid
    files = [f for f in os.listdir(domain_dir) if f not in ("tmp", ".lock")]
    assert files and all(os.stat(os.path.join(domain_dir, f)).st_uid == nobody.pw_uid for f in files)
