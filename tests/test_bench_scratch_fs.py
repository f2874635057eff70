"""The intake bench's fresh filesystem (bench/scratch_fs.py): a real ext4 of its own
for each server's turn, and nothing left behind, neither mount nor loop device nor
image, whether the turn ends well or fails."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
import scratch_fs  # noqa: E402

pytestmark = pytest.mark.skipif(scratch_fs.available() is not None,
                                reason="fresh filesystems need root, mkfs.ext4 and mount")


def loop_devices_on(image: str) -> str:
    return subprocess.run(["losetup", "-j", image], capture_output=True, text=True).stdout


def test_a_turn_gets_an_empty_ext4_of_its_own_and_leaves_nothing(tmp_path):
    with scratch_fs.fresh_ext4(str(tmp_path), 64 << 20) as where:
        assert os.path.ismount(where)
        fs_type = subprocess.run(["findmnt", "-n", "-o", "FSTYPE", where], capture_output=True,
                                 text=True).stdout.strip()
        assert fs_type == "ext4"
        assert sorted(os.listdir(where)) == ["lost+found"]       # nothing from an earlier turn
        images = [n for n in os.listdir(tmp_path) if n.endswith(".img")]
        assert len(images) == 1
        image = str(tmp_path / images[0])
        assert loop_devices_on(image)
        with open(os.path.join(where, "message"), "wb") as fh:
            fh.write(b"x" * 10240)
            os.fsync(fh.fileno())
    assert not os.path.ismount(where)
    assert os.listdir(tmp_path) == []
    assert not loop_devices_on(image)


def test_a_turn_that_fails_still_unmounts_and_removes_its_image(tmp_path):
    with pytest.raises(RuntimeError):
        with scratch_fs.fresh_ext4(str(tmp_path), 64 << 20) as where:
            with open(os.path.join(where, "spooled"), "wb") as fh:
                fh.write(b"x")
            raise RuntimeError("the server failed")
    assert not os.path.ismount(where)
    assert os.listdir(tmp_path) == []


def test_the_size_covers_both_loads():
    assert scratch_fs.size_for(10000, 10240) >= 2 * 10000 * (10240 + 4096)
    assert scratch_fs.size_for(1, 10) == 256 << 20
    assert scratch_fs.inodes_for(10000) >= 2 * 10000 * 3       # Exim: -D, -H, msglog


def test_the_bench_sizes_make_a_server_like_ext4_with_inodes_for_both_loads(tmp_path):
    """4 KiB blocks at any size, and inodes for Exim's three files a message over two loads
    (mkfs's own choice at 10,000 messages of 10 KB is 33,760: Exim ran out of them)."""
    for messages in (500, 10000):
        size, inodes = scratch_fs.size_for(messages, 10240), scratch_fs.inodes_for(messages)
        with scratch_fs.fresh_ext4(str(tmp_path), size, inodes) as where:
            fs = os.statvfs(where)
            assert fs.f_frsize == 4096
            assert fs.f_ffree >= 2 * messages * 3
            assert fs.f_bavail * fs.f_frsize >= 2 * messages * (12288 + 2 * 4096)


def test_a_ctrl_c_while_mount_runs_still_leaves_nothing(tmp_path, monkeypatch):
    """mount(8) done, the KeyboardInterrupt raised before fresh_ext4 heard back from it."""
    real_run = subprocess.run

    def run(cmd, *args, **kwargs):
        done = real_run(cmd, *args, **kwargs)
        if os.path.basename(cmd[0]) == "mount":
            raise KeyboardInterrupt
        return done

    monkeypatch.setattr(subprocess, "run", run)
    with pytest.raises(KeyboardInterrupt):
        with scratch_fs.fresh_ext4(str(tmp_path), 64 << 20):
            pass
    monkeypatch.undo()
    assert not subprocess.run(["findmnt", "-n", "-R", str(tmp_path)], capture_output=True).stdout
    assert os.listdir(tmp_path) == []
