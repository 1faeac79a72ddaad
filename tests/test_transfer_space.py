"""Preallocation of a download on a real small filesystem: ENOSPC is raised, not hidden."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from edgeagent.protocol import BundleRef
from edgeagent.transfer import BlockDownloader, TransferConfig


def test_preallocation_that_does_not_fit_raises_enospc_and_leaves_nothing(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
    try:
        # _open needs no session: the downloader's state without its MQTT subscription.
        downloader = BlockDownloader.__new__(BlockDownloader)
        downloader.config = TransferConfig()
        ref = BundleRef(name="big", version="1.0.0", sha256="c" * 64, size=4 * 1024 * 1024)
        part, state = mnt / f"{ref.sha256}.part", mnt / f"{ref.sha256}.state"
        with pytest.raises(OSError) as info:
            downloader._open(ref, part, state)
        # Before: ftruncate made a sparse 4 MiB file on a 1 MiB disk and the download went on.
        assert info.value.errno == errno.ENOSPC
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
