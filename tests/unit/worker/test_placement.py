"""Placement of a worker on one of admission's devices: best fit."""

import pytest

from services.worker.placement import Candidate, place

GB = 10**9


def test_best_fit_keeps_the_large_holes_for_large_models():
    devices = [Candidate("gpu:0", 20 * GB), Candidate("gpu:1", 6 * GB), Candidate("gpu:2", 3 * GB)]
    assert place(5 * GB, devices).device == "gpu:1"
    assert place(2 * GB, devices).device == "gpu:2"
    assert place(10 * GB, devices).device == "gpu:0"


def test_ties_go_to_the_lower_id_and_nothing_fitting_goes_where_most_is_free():
    assert place(1 * GB, [Candidate("gpu:1", 4 * GB), Candidate("gpu:0", 4 * GB)]).device == "gpu:0"
    devices = [Candidate("cpu:0", 1 * GB), Candidate("cpu:1", 2 * GB)]
    assert place(5 * GB, devices).device == "cpu:1", "wait where the most is free"
    with pytest.raises(ValueError):
        place(1, [])
