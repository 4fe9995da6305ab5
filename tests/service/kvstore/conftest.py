from __future__ import annotations

import grpc
import pytest

from .support import kvstore_servers, stub


@pytest.fixture
def start_kvstore(tmp_path):
    with kvstore_servers(tmp_path) as start:
        yield start


@pytest.fixture(scope="module")
def shared_kvstore(tmp_path_factory):
    with kvstore_servers(tmp_path_factory.mktemp("kvstore")) as start:
        yield start()


@pytest.fixture(scope="module")
def kv(shared_kvstore):
    with grpc.insecure_channel(shared_kvstore.address) as channel:
        yield stub(channel)
