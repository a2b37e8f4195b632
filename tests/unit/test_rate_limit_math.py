"""Token-bucket (GCRA) arithmetic with an injected clock: refill, burst, cost, several limits,
Retry-After and the RateLimit header's reset value; plus properties checked by hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.state.gcra import TICKS_PER_SECOND, Limit, parse_rate, reset_after, retry_after, take

S = TICKS_PER_SECOND
T0 = 1_000 * S  # an arbitrary "now"


def bucket(rate: str, burst: int | None = None, name: str = "x") -> Limit:
    count, period = parse_rate(rate)
    return Limit(count, period, burst or count, name)


def test_parse_rate() -> None:
    assert parse_rate("100/s") == (100, 1)
    assert parse_rate("6000/m") == (6000, 60)
    assert parse_rate("10/5s") == (10, 5)
    assert parse_rate("1000/hour") == (1000, 3600)
    assert parse_rate(" 7 / d ") == (7, 86400)
    for bad in ("", "100", "100/", "x/s", "0/s", "10/0s", "10/fortnight", "-1/s"):
        with pytest.raises(ValueError, match="invalid rate"):
            parse_rate(bad)


def test_fresh_bucket_admits_exactly_burst_then_refuses() -> None:
    lim = bucket("10/s", burst=5)
    tats = [0]
    results = [take(tats, T0, 1, [lim])[0] for _ in range(8)]
    assert results == [True] * 5 + [False] * 3


def test_refill_one_token_per_interval() -> None:
    lim = bucket("10/s", burst=2)  # a token every 100 ms
    tats = [0]
    assert take(tats, T0, 1, [lim])[0]
    assert take(tats, T0, 1, [lim])[0]
    assert not take(tats, T0, 1, [lim])[0]
    assert not take(tats, T0 + 99_999, 1, [lim])[0]
    assert take(tats, T0 + 100_000, 1, [lim])[0]
    assert not take(tats, T0 + 100_000, 1, [lim])[0]
    # A long idle time refills up to the burst, never beyond.
    later = T0 + 3600 * S
    assert [take(tats, later, 1, [lim])[0] for _ in range(3)] == [True, True, False]


def test_cost_greater_than_one() -> None:
    lim = bucket("10/s", burst=10)
    tats = [0]
    assert take(tats, T0, 4, [lim]) == (True, [400_000])
    assert take(tats, T0, 4, [lim]) == (True, [800_000])
    allowed, waits = take(tats, T0, 4, [lim])  # only 2 tokens left
    assert not allowed
    assert lim.remaining(waits[0]) == 2
    assert retry_after(waits, 4, [lim]) == 200_000  # 2 more tokens: 200 ms
    assert take(tats, T0 + 200_000, 4, [lim])[0]


def test_several_limits_all_must_pass_and_a_refusal_consumes_nothing() -> None:
    per_second = bucket("2/s", name="second")
    per_minute = bucket("3/m", name="minute")
    limits = [per_second, per_minute]
    tats = [0, 0]
    assert take(tats, T0, 1, limits)[0]
    assert take(tats, T0, 1, limits)[0]
    before = list(tats)
    allowed, waits = take(tats, T0, 1, limits)  # the per-second limit refuses
    assert not allowed
    assert tats == before  # and the per-minute bucket was not charged
    assert per_minute.remaining(waits[1]) == 1
    assert retry_after(waits, 1, limits) == 500_000
    # One second later the per-second bucket is full but the minute has one token left.
    assert take(tats, T0 + S, 1, limits)[0]
    allowed, waits = take(tats, T0 + S, 1, limits)
    assert not allowed
    assert per_minute.remaining(waits[1]) == 0
    # The minute limit refills one token per 20 s; the first was taken at T0.
    assert retry_after(waits, 1, limits) == 20 * S - S


def test_retry_after_and_reset_values() -> None:
    lim = bucket("6000/m", burst=3)  # a token every 10 ms
    tats = [0]
    for _ in range(3):
        assert take(tats, T0, 1, [lim])[0]
    allowed, waits = take(tats, T0, 1, [lim])
    assert not allowed
    assert waits == [30_000]
    assert retry_after(waits, 1, [lim]) == 10_000
    # With nothing left, the header's reset is the time to the next token (= Retry-After) ...
    assert reset_after(waits[0], lim) == 10_000
    # ... and with some left, the time until the bucket is full again.
    assert reset_after(10_000, lim) == 10_000
    assert lim.remaining(10_000) == 2


def test_reading_with_cost_zero_changes_nothing() -> None:
    lim = bucket("5/s")
    tats = [0]
    take(tats, T0, 2, [lim])
    before = list(tats)
    allowed, waits = take(tats, T0, 0, [lim])
    assert allowed and tats == before and lim.remaining(waits[0]) == 3


def test_scaled_divides_rate_and_burst_keeping_at_least_one() -> None:
    lim = bucket("100/s", burst=50)
    half = lim.scaled(2)
    assert (half.count, half.burst, half.interval) == (50, 25, lim.interval * 2)
    tiny = bucket("1/s").scaled(4)
    assert (tiny.count, tiny.burst) == (1, 1)
    assert lim.scaled(1) is lim


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(1, 1000),
    period=st.sampled_from([1, 60, 3600]),
    burst=st.integers(1, 200),
    steps=st.lists(st.tuples(st.integers(0, 2 * S), st.integers(1, 5)), max_size=60),
)
def test_never_admits_more_than_burst_plus_refill(
    count: int, period: int, burst: int, steps: list[tuple[int, int]]
) -> None:
    """Over any sequence of requests, the tokens admitted never exceed the burst plus what
    refilled over the elapsed time, and a refused request leaves the bucket untouched."""
    lim = Limit(count, period, burst)
    tats = [0]
    now = T0
    admitted = 0
    for advance, asked in steps:
        cost = min(asked, burst)  # the config refuses a cost above the burst
        now += advance
        before = list(tats)
        allowed, waits = take(tats, now, cost, [lim])
        if allowed:
            admitted += cost
            assert 0 <= lim.remaining(waits[0]) <= burst - cost
        else:
            assert tats == before
            wait = retry_after(waits, cost, [lim])
            assert wait > 0
            # Retry-After is exact: one tick earlier is refused, at it admitted.
            assert not take(list(tats), now + wait - 1, cost, [lim])[0]
            assert take(list(tats), now + wait, cost, [lim])[0]
        refilled = (now - T0) // lim.interval
        assert admitted <= burst + refilled
