"""The kvstore's settings and the same-host client helper."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from services.common.errors import ConfigError
from services.kvstore.arena import Arena
from services.kvstore.checksum import checksum as host_checksum
from services.kvstore.client import (
    RegionError,
    checksum,
    map_region,
    read_region,
    read_region_async,
    write_region,
)
from services.kvstore.settings import default_capacity, load_settings


def test_defaults_resolve_once():
    settings = load_settings([], environ={})
    assert settings.listen == "127.0.0.1:50052" and settings.store_id == "main"
    assert settings.shm_dir == "/dev/shm" and settings.segment_bytes == 256 << 20
    assert settings.capacity_bytes == default_capacity() > 0
    assert settings.state_dir.endswith(".cache/lmx/kvstore/main")
    assert settings.spill_dir == settings.state_dir + "/spill"
    assert settings.when_full == "spill" and settings.keep_on_stop and settings.clean_stale
    assert settings.export_chunk_bytes == 4 << 20
    assert settings.spare_bytes == 2 << 30


def test_capacity_fits_the_shm_filesystem(tmp_path):
    """A container's /dev/shm is 64 MB unless told otherwise: the default
    capacity stays under what --shm-dir holds, and a larger one is refused
    (writing past it would kill the writer with SIGBUS)."""
    import os
    st = os.statvfs(tmp_path)
    size = st.f_blocks * st.f_frsize
    settings = load_settings(["--shm-dir", str(tmp_path)], environ={})
    assert 0 < settings.capacity_bytes <= size * 9 // 10
    with pytest.raises(ConfigError, match="more than"):
        load_settings(["--shm-dir", str(tmp_path), "--capacity-bytes", str(size + 4096)],
                      environ={})


def test_flags_and_environment():
    settings = load_settings(["--capacity-bytes", "1GiB", "--when-full", "refuse"],
                             environ={"LMX_KVSTORE_STORE_ID": "b2", "LMX_KVSTORE_KEEP_ON_STOP": "0"})
    assert settings.capacity_bytes == 1 << 30 and settings.when_full == "refuse"
    assert settings.store_id == "b2" and not settings.keep_on_stop


@pytest.mark.parametrize(("argv", "setting"), [
    (["--when-full", "drop"], "when_full"),
    (["--store-id", "a-b"], "store_id"),
    (["--segment-bytes", "1000"], "segment_bytes"),
    (["--listen", "nowhere"], "listen"),
    (["--export-chunk-bytes", "0"], "export_chunk_bytes"),
    (["--spare-bytes", "-1"], "spare_bytes"),
])
def test_bad_settings_name_the_setting(argv, setting):
    with pytest.raises(ConfigError) as err:
        load_settings(argv, environ={})
    assert err.value.setting == setting


def test_client_maps_regions(tmp_path):
    arena = Arena(tmp_path, "c", 1 << 20)
    try:
        arena.allocate(5000)
        region = arena.allocate(10_000)     # at a non-zero offset
        where = SimpleNamespace(segment=str(tmp_path / region.segment), offset=region.offset,
                                length=region.length)
        data = bytes(range(256)) * 39 + b"0123456789abcdef"
        assert write_region(where, data) == host_checksum(data) == checksum(data)
        assert bytes(arena.view(region)) == data
        assert read_region(where) == data
        assert asyncio.run(read_region_async(where)) == data
        with map_region(where) as view:
            assert len(view) == 10_000 and view.readonly
        with pytest.raises(RegionError):
            write_region(where, b"short")
        with pytest.raises(RegionError):
            read_region(SimpleNamespace(segment=where.segment, offset=1 << 20, length=1))
        with pytest.raises(RegionError):
            read_region(SimpleNamespace(segment="/etc/passwd", offset=0, length=1))
    finally:
        arena.close()
