"""The lock that keeps two invocations from training the same run at once."""

import datetime
import json
import os
import socket
import sys
from pathlib import Path
from typing import Optional

from sb3_elmur.common.utils import open_locked


class RunLock:
    """Exclusive ``flock`` of one run, so that two invocations never train the same run at once. The operating
    system releases it when the last process holding it exits (a worker inherits its launcher's lock), so a
    killed invocation never leaves a stale lock. The lock file holds the holder's pid, host and start time, and is
    removed on release (unless a worker may still share the lock); a file that a killed holder left is taken over.

    :param path: the lock file (beside the run's record)
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.fd: Optional[int] = None

    def acquire(self) -> bool:
        """Take the lock without waiting. :return: whether it was taken (False: another process holds it)."""
        fd = open_locked(self.path)
        if fd is None:
            return False
        holder = dict(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            command=" ".join(sys.argv),
        )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self.fd = fd
        return True

    def holder(self) -> str:
        """Who holds the lock, as its holder wrote it in the lock file."""
        try:
            holder = json.loads(self.path.read_text())
            return f"pid {holder['pid']} on {holder['host']}, since {holder['started']} ({holder['command']})"
        except (OSError, ValueError, KeyError, TypeError):
            # The holder has not written its details yet (or the file is not ours).
            return f"an unknown process (lock file {self.path})"

    def release(self, remove: bool = True) -> None:
        """Release the lock (if held).

        :param remove: remove the lock file too (still locked, so that a process that opened it meanwhile finds it
            gone and opens a new one). Pass False while a worker that shares the lock may still run: its lock must
            stay on the file that others open.
        """
        if self.fd is not None:
            if remove:
                self.path.unlink(missing_ok=True)
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None
