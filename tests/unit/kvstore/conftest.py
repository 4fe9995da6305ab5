"""Stores over temporary directories (the shm directory is a setting: unit
tests never touch /dev/shm)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.kvstore.entry import Layout
from services.kvstore.store import Store, StoreConfig

SEGMENT = 64 << 10


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0   # every reading is later: LRU order is call order
        return self.now


def layout(num_tokens: int = 4, num_layers: int = 2, num_kv_heads: int = 2, head_dim: int = 64,
           dtype: str = "float32") -> Layout:
    """2 * 2 * 4 * 2 * 64 * 4 = 8 KiB by default."""
    return Layout(model="m", model_version="1", dtype=dtype, num_layers=num_layers,
                  num_kv_heads=num_kv_heads, head_dim=head_dim, num_tokens=num_tokens)


@pytest.fixture
def dirs(tmp_path) -> dict[str, Path]:
    return {"shm_dir": tmp_path / "shm", "state_dir": tmp_path / "state" / "s1",
            "spill_dir": tmp_path / "state" / "s1" / "spill"}


@pytest.fixture
def make_store(dirs):
    made: list[Store] = []

    def make(store_id: str = "s1", start: bool = True, **overrides) -> Store:
        config = dict(dirs, store_id=store_id, segment_bytes=SEGMENT, capacity_bytes=1 << 20,
                      spare_bytes=1 << 20,
                      when_full="spill", keep_on_stop=True, clean_stale=True)
        if store_id != "s1" and "state_dir" not in overrides:
            config["state_dir"] = dirs["state_dir"].parent / store_id
            config["spill_dir"] = config["state_dir"] / "spill"
        config.update(overrides)
        store = Store(StoreConfig(**config), clock=FakeClock())
        if start:
            store.start()
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()   # idempotent; removes every segment


def shm_files(dirs, prefix: str = "lmx-s1-") -> list[str]:
    if not dirs["shm_dir"].exists():
        return []
    return sorted(p.name for p in dirs["shm_dir"].iterdir() if p.name.startswith(prefix))
