"""The streamed layers' weights in host memory, shared between the workers of
one model on one host: one shared-memory file per (model, dtype, streamed
layers), written by the first worker and mapped by the others, so the host
holds them once however many workers stream that model.

The file appears whole or not at all (written under a temporary name, then
renamed). Each user holds a shared flock on it while it is mapped; the last
one to close takes the exclusive lock and removes it. Creation and removal
are serialised by a lock file beside it. Files are owner-only (0600).
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from services.common.parent import process_alive

log = structlog.get_logger(__name__)

PREFIX = "lmx-weights-"


def weights_key(model: str, layout: str, streamed: list[int], layer_bytes: int) -> str:
    """The file's name for a model's streamed layers: `layout` names each of a
    layer's tensors' dtype and shape (a quantized model's differ)."""
    text = f"{model}|{layout}|{','.join(map(str, streamed))}|{layer_bytes}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass
class SharedHostWeights:
    """One model's streamed weights, `num_bytes` of them, in `shm_dir`."""

    key: str
    num_bytes: int
    shm_dir: Path = Path("/dev/shm")

    def __post_init__(self) -> None:
        self.path = Path(self.shm_dir) / f"{PREFIX}{self.key}"
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        self._fd: int | None = None
        self._map: mmap.mmap | None = None

    def open(self) -> tuple[memoryview, bool]:
        """The bytes, and whether they are already filled (another worker
        wrote them); when not, the caller fills them before `publish()`."""
        with self._creation_lock():
            try:
                fd = os.open(self.path, os.O_RDWR)
            except FileNotFoundError:
                fd = None
            if fd is not None and os.fstat(fd).st_size == self.num_bytes:
                self._use(fd)
                log.info("shared_weights_mapped", path=str(self.path), bytes=self.num_bytes)
                return memoryview(self._map), True
            if fd is not None:
                os.close(fd)        # another size: a stale file of another layout
            self._remove_stale_writes()
            self._check_room()
            self._tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
            fd = os.open(self._tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(fd, self.num_bytes)
            self._use(fd)
            return memoryview(self._map), False

    def publish(self) -> None:
        """The bytes are written: other workers may map them now."""
        with self._creation_lock():
            os.replace(self._tmp, self.path)
        log.info("shared_weights_written", path=str(self.path), bytes=self.num_bytes)

    def close(self) -> None:
        """Unmap; the last user removes the file."""
        if self._fd is None:
            return
        with self._creation_lock():
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                last = True
            except BlockingIOError:
                last = False
            if last:
                self.path.unlink(missing_ok=True)
                tmp = getattr(self, "_tmp", None)
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
                # A process waiting on this lock file then locks a removed
                # inode: at worst it writes its own copy instead of sharing.
                self._lock_path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:    # a tensor still views it; unmapped when collected
                pass
            self._map = None

    # ---- helpers ----
    def _remove_stale_writes(self) -> None:
        """Temporary files of writers that died before renaming them."""
        for tmp in Path(self.shm_dir).glob(f"{self.path.name}.*.tmp"):
            pid = tmp.name[len(self.path.name) + 1:-len(".tmp")]
            if pid.isdigit() and not process_alive(int(pid)):
                tmp.unlink(missing_ok=True)
                log.info("shared_weights_stale_removed", path=str(tmp))

    def _use(self, fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._fd = fd
        self._map = mmap.mmap(fd, self.num_bytes)

    def _check_room(self) -> None:
        st = os.statvfs(self.shm_dir)
        if st.f_bavail * st.f_frsize < self.num_bytes:
            raise OSError(f"{self.shm_dir} has {st.f_bavail * st.f_frsize} bytes free, the "
                          f"streamed weights need {self.num_bytes}")

    class _Lock:
        def __init__(self, path: Path):
            self.path = path

        def __enter__(self):
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(self.fd, fcntl.LOCK_EX)

        def __exit__(self, *exc):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)

    def _creation_lock(self) -> SharedHostWeights._Lock:
        return SharedHostWeights._Lock(self._lock_path)

