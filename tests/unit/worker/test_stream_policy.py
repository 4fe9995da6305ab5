"""services/worker/stream_policy.py: how many layers an auto worker streams
to make room for other models, and when it takes turns whole instead."""

import pytest

from services.common.errors import ConfigError
from services.worker.settings import load_settings
from services.worker.stream_policy import DEFAULT_MAX_SHARE, StreamPolicy


def test_a_model_that_fits_alone_streams_at_most_its_share():
    policy = StreamPolicy.for_model(28, 0.1, whole_bytes=4 << 30, budget_bytes=8 << 30)
    assert policy.fits_alone and policy.max_streamed == 2
    assert policy.may_stream(2) and not policy.may_stream(3)


def test_a_model_that_does_not_fit_alone_streams_what_it_must():
    policy = StreamPolicy.for_model(28, 0.05, whole_bytes=9 << 30, budget_bytes=8 << 30)
    assert not policy.fits_alone and policy.max_streamed == 28
    assert policy.may_stream(28)
    assert policy.start_layers(3) == 3, "what fits now, the rest streamed: its only way to run"


def test_at_start_it_streams_what_does_not_fit_only_within_its_share():
    policy = StreamPolicy(30, 0.2, fits_alone=True)           # up to 6 of 30
    assert policy.start_layers(30) == 30
    assert policy.start_layers(24) == 24, "6 streamed: within the share"
    assert policy.start_layers(23) == 30, "7 would stream: all of them, the lease waits"
    assert policy.start_layers(0) == 30
    assert policy.start_layers(99) == 30


def test_a_share_of_zero_never_streams_to_make_room_and_one_always_may():
    assert StreamPolicy(16, 0.0, fits_alone=True).max_streamed == 0
    assert StreamPolicy(16, 0.0, fits_alone=True).start_layers(15) == 16
    assert StreamPolicy(16, 1.0, fits_alone=True).start_layers(0) == 0


def test_the_default_share_is_a_step_s_hidden_copy_and_a_bad_one_is_refused():
    assert load_settings(["--model", "m"], {}).stream_max_share == DEFAULT_MAX_SHARE == 0.05
    assert load_settings(["--model", "m", "--stream-max-share", "0.25"], {}).stream_max_share \
        == 0.25
    # 5% of a 28-layer model is one layer; of a 16-layer one, none.
    assert StreamPolicy(28, DEFAULT_MAX_SHARE, True).max_streamed == 1
    assert StreamPolicy(16, DEFAULT_MAX_SHARE, True).max_streamed == 0
    with pytest.raises(ConfigError) as caught:
        load_settings(["--model", "m", "--stream-max-share", "1.5"], {})
    assert caught.value.setting == "stream_max_share"
