"""Properties of the cache key: equal requests collide, any meaningful change separates them."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dspy_service.cache import CachedAnswer, MemoryCache, cache_key

BASE: dict[str, Any] = {
    "namespace": "svc|simulator|dspy 3.4.1|format 2",
    "scope": None,
    "model": "gpt-4",
    "model_id": "openai/gpt-4",
    "variant": "baseline",
    "program_fingerprint": "abc123",
    "inputs": {"question": "What is the capital of France?"},
    "parameters": {"temperature": 0.5, "max_tokens": 100},
}

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**53), 2**53),
    st.text(max_size=20),
    st.floats(allow_nan=False, allow_infinity=False),
)
parameters = st.dictionaries(st.text(min_size=1, max_size=12), json_scalars, max_size=6)


@given(parameters)
def test_parameter_order_does_not_change_the_key(params: dict[str, Any]) -> None:
    """The same parameters in any insertion order give the same key."""
    reordered = dict(reversed(list(params.items())))
    assert cache_key(**{**BASE, "parameters": params}) == cache_key(**{**BASE, "parameters": reordered})


@given(
    st.sampled_from(["namespace", "scope", "model", "model_id", "variant", "program_fingerprint", "inputs"]),
    st.text(max_size=30),
)
def test_any_change_to_an_identity_field_changes_the_key(field: str, value: str) -> None:
    """Changing the deployment (service, provider endpoint, DSPy version), the tenant scope, model,
    provider model, variant, program or input gives another key."""
    changed = {**BASE, field: {"question": value} if field == "inputs" else value}
    if changed[field] != BASE[field]:
        assert cache_key(**changed) != cache_key(**BASE)


@given(parameters, st.text(min_size=1, max_size=12), json_scalars)
def test_any_change_to_a_parameter_changes_the_key(params: dict[str, Any], name: str, value: Any) -> None:
    """Adding, removing or changing any parameter gives another key."""
    changed = {**params, name: value}
    if changed != params:
        assert cache_key(**{**BASE, "parameters": changed}) != cache_key(**{**BASE, "parameters": params})


def test_int_and_float_parameters_are_distinct_but_stable() -> None:
    """Keys are deterministic across calls."""
    assert cache_key(**BASE) == cache_key(**BASE)


def test_cached_answer_round_trips_through_bytes() -> None:
    """What Redis stores reads back as the same answer."""
    answer = CachedAnswer({"answer": "Paris", "n": [1, 2]}, "answer", "gpt-4", 10, 3, None)
    assert CachedAnswer.from_bytes(answer.to_bytes()) == answer
    assert answer.output == "Paris"


def test_an_entry_of_the_old_format_is_not_read_as_an_answer() -> None:
    """Entries written before the format carried its version (the output kept twice) are misses."""
    old = b'[{"answer": "Paris"}, "Paris", "gpt-4", 10, 3, null]'
    with pytest.raises(ValueError, match=r"not enough values|format"):
        CachedAnswer.from_bytes(old)


def test_memory_cache_evicts_least_recently_used() -> None:
    """A full memory level drops the entry used least recently."""
    cache = MemoryCache(max_entries=2, ttl_secs=60)
    answers = [CachedAnswer({"n": i}, "n", "m", 0, 0, 0.0) for i in range(3)]
    cache.set("a", answers[0], 10)
    cache.set("b", answers[1], 10)
    assert cache.get("a") is answers[0]
    cache.set("c", answers[2], 10)
    assert cache.get("b") is None
    assert cache.get("a") is answers[0]
    assert len(cache) == 2


def test_memory_cache_is_bounded_in_bytes_as_well_as_entries() -> None:
    """Large answers evict others long before the entry bound: the level never holds more bytes
    (JSON plus the per-entry overhead) than MEMORY_CACHE_MAX_BYTES; one larger than it is not kept."""
    cache = MemoryCache(max_entries=10_000, ttl_secs=60, max_bytes=1_000_000)
    big = CachedAnswer({"answer": "x" * 100_000}, "answer", "m", 0, 0, 0.0)
    for n in range(50):
        cache.set(str(n), big, 100_000)
    assert len(cache) == 9  # 9 x (100,000 + 1 KiB) fit in 1,000,000 bytes
    assert cache.current_bytes <= 1_000_000
    assert cache.get("49") is big
    assert cache.get("0") is None
    cache.set("huge", big, 2_000_000)
    assert cache.get("huge") is None


def test_memory_cache_entry_bound_still_holds_for_small_answers() -> None:
    """Tiny answers weigh at least max_bytes / max_entries, so the entry bound holds too."""
    cache = MemoryCache(max_entries=5, ttl_secs=60, max_bytes=1_000_000)
    for n in range(20):
        cache.set(str(n), CachedAnswer({"n": n}, "n", "m", 0, 0, 0.0), 10)
    assert len(cache) == 5
