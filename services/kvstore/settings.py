"""The KV store's settings: one frozen object, built once at start."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.common import settings as loader
from services.common.settings import ServerFields
from services.common.errors import ConfigError
from services.common.units import parse_bytes
from services.kvstore.arena import ALIGN

DEFAULT_LISTEN = "127.0.0.1:50052"
STORE_ID = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def shm_size(shm_dir: str) -> int | None:
    """The size of the filesystem holding `shm_dir` (a container's /dev/shm is
    64 MB unless told otherwise); None if it cannot be read."""
    try:
        st = os.statvfs(shm_dir)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize


def default_capacity(shm_dir: str = "/dev/shm") -> int:
    """A quarter of the host's RAM, and at most 90% of what `shm_dir` holds."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    size = shm_size(shm_dir)
    return ram if size is None else min(ram, size * 9 // 10)


@dataclass(frozen=True)
class KVStoreSettings(ServerFields):
    listen: str = field(default=DEFAULT_LISTEN, metadata={"help": "HOST:PORT to serve on"})
    store_id: str = field(default="main", metadata={
        "help": "names this store's segments lmx-<store_id>-<n> (letters, digits, _)"})
    shm_dir: str = field(default="/dev/shm", metadata={
        "help": "directory of the shared-memory segment files"})
    segment_bytes: int = field(default=256 << 20, metadata={
        "help": "size of a shared-memory segment (a larger entry gets its own)",
        "parse": parse_bytes})
    spare_bytes: int = field(default=2 << 30, metadata={
        "help": "emptied segments of entries larger than --segment-bytes kept for the next such "
                "entry (a new segment costs its first touch and a GPU worker's pinning of it), "
                "at most this many bytes of them, within --capacity-bytes (0: none)",
        "parse": parse_bytes})
    capacity_bytes: int = field(default=0, metadata={
        "help": "shared memory the entries may use (0: a quarter of RAM, at most 90% of --shm-dir)", "parse": parse_bytes})
    when_full: str = field(default="spill", metadata={
        "help": "spill (least recently used entries to --spill-dir) | refuse "
                "(RESOURCE_EXHAUSTED)"})
    state_dir: str = field(default="", metadata={
        "help": "where the manifest lives (default ~/.cache/lmx/kvstore/<store_id>)"})
    spill_dir: str = field(default="", metadata={
        "help": "where spilled entries go (default <state_dir>/spill)"})
    keep_on_stop: bool = field(default=True, metadata={
        "help": "on a clean stop, spill ready entries so that a restart keeps them"})
    clean_stale: bool = field(default=True, metadata={
        "help": "at start, remove other stores' segments when that store is not running "
                "and has no manifest"})
    max_entry_bytes: int = field(default=0, metadata={
        "help": "largest entry accepted (0: the capacity)", "parse": parse_bytes})
    reservation_ttl_s: float = field(default=60.0, metadata={
        "help": "a reservation not committed within this many seconds is dropped and its "
                "memory freed (0: never)"})
    manifest_delay_s: float = field(default=1.0, metadata={
        "help": "commits and deletes go on the manifest's journal at once (one line each); "
                "the whole manifest is rewritten this long after, once for all that came "
                "meanwhile (0: no journal, the whole manifest on every commit and delete)"})
    export_chunk_bytes: int = field(default=4 << 20, metadata={
        "help": "default chunk size of Export", "parse": parse_bytes})
    grace_s: float = field(default=5.0, metadata={"help": "shutdown grace period"})
    log_format: str = field(default="auto", metadata={"help": "auto | json | console"})
    log_level: str = field(default="info", metadata={"help": "debug | info | warning | error"})

    def __post_init__(self) -> None:
        loader.check_common(self)
        if not STORE_ID.match(self.store_id):
            raise ConfigError("store_id", f"bad store id {self.store_id!r}",
                              fix="1-64 letters, digits or _")
        if self.segment_bytes <= 0 or self.segment_bytes % ALIGN:
            raise ConfigError("segment_bytes", f"must be a positive multiple of {ALIGN}")
        if self.when_full not in ("spill", "refuse"):
            raise ConfigError("when_full", f"unknown policy {self.when_full!r}",
                              fix="use spill or refuse")
        for name in ("capacity_bytes", "max_entry_bytes", "reservation_ttl_s",
                     "manifest_delay_s", "spare_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(name, "must not be negative")
        if not 0 < self.export_chunk_bytes <= 32 << 20:
            raise ConfigError("export_chunk_bytes", "must be in (0, 32MiB]")
        # Resolve the defaults that depend on the host, once.
        if not self.capacity_bytes:
            object.__setattr__(self, "capacity_bytes", default_capacity(self.shm_dir))
        size = shm_size(self.shm_dir)
        if size is not None and self.capacity_bytes > size:
            # Writing past what the filesystem holds kills the writer (SIGBUS).
            raise ConfigError("capacity_bytes",
                              f"{self.capacity_bytes} bytes is more than {self.shm_dir} holds "
                              f"({size} bytes)",
                              fix="lower --capacity-bytes, or give the shm filesystem more room "
                                  "(docker: shm_size)")
        if not self.state_dir:
            object.__setattr__(self, "state_dir", str(
                Path.home() / ".cache" / "lmx" / "kvstore" / self.store_id))
        if not self.spill_dir:
            object.__setattr__(self, "spill_dir", str(Path(self.state_dir) / "spill"))


def load_settings(argv: Sequence[str] | None = None,
                  environ: Mapping[str, str] | None = None) -> KVStoreSettings:
    return loader.load(KVStoreSettings, "kvstore", argv, environ,
                       description="lmx kvstore: parked KV caches in shared host memory")
