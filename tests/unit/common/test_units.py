"""Byte sizes and addresses as people write them."""

from __future__ import annotations

import pytest

from services.common.units import format_bytes, parse_address, parse_bytes


@pytest.mark.parametrize("text, expected", [
    ("4096", 4096),
    ("0", 0),
    ("8GiB", 8 << 30),
    ("8 GiB", 8 << 30),
    (" 512MiB ", 512 << 20),
    ("512mib", 512 << 20),
    ("1.5GB", 1_500_000_000),
    ("2k", 2000),
    ("2KiB", 2048),
    ("3MB", 3_000_000),
    ("1TiB", 1 << 40),
    ("1t", 10**12),
    ("7B", 7),
    ("0.5KiB", 512),
    (4096, 4096),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected, f"parse_bytes({text!r})"


@pytest.mark.parametrize("text", ["", "GiB", "-1", "-1GiB", "8 GiBs", "8XB", "1e3", "8,5GiB",
                                  "lots", "1.5.2MB", -1])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError):
        parse_bytes(text)


@pytest.mark.parametrize("num, expected", [
    (0, "0 B"),
    (1023, "1023 B"),
    (1024, "1.00 KiB"),
    (1536, "1.50 KiB"),
    (4 << 30, "4.00 GiB"),
    (512 << 20, "512.00 MiB"),
    (-(1 << 20), "-1.00 MiB"),
    (-5, "-5 B"),
    (3 << 40, "3.00 TiB"),
    (5000 << 40, "5000.00 TiB"),
])
def test_format_bytes(num, expected):
    assert format_bytes(num) == expected


def test_format_then_parse_round_trips_whole_units():
    for num in (1, 1 << 10, 3 << 20, 7 << 30):
        assert parse_bytes(format_bytes(num).replace(" ", "")) == num


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:50051", ("127.0.0.1", 50051)),
    ("localhost:0", ("localhost", 0)),
    ("[::1]:50051", ("::1", 50051)),
    ("0.0.0.0:65535", ("0.0.0.0", 65535)),
])
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["localhost", ":50051", "localhost:", "localhost:abc",
                                  "localhost:65536", "localhost:-1", ""])
def test_parse_address_rejects(text):
    with pytest.raises(ValueError):
        parse_address(text)
