"""Prompt memory in Redis (label_studio_sam2.service.redismemory) against a real redis-server: what one process
remembers another reads back, values are checked before use, and a Redis that is down or silent
costs a click at most about a second, once, with one warning."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time

import numpy as np
import pytest

from label_studio_sam2.service.promptmemory import Remembered
from label_studio_sam2.service.redismemory import FORMAT, PREFIX, RedisPromptMemory, decode, encode, redis_key
from label_studio_sam2.service.settings import Settings, SettingsError

KEY = (7, "image", "car")


def remembered(seed: int = 0, box=(10.0, 20.5, 30.0, 40.25)) -> Remembered:
    logits = np.random.default_rng(seed).normal(0, 5, (1, 64, 64)).astype(np.float32)
    points = frozenset({(12.5, 30.1234, 1), (50.0, 50.0, 0)})
    return Remembered(box, points, logits, time.monotonic())


def same(a: Remembered, b: Remembered) -> bool:
    return (
        a.box == b.box and a.points == b.points and np.array_equal(np.asarray(a.logits), np.asarray(b.logits))
    )


def test_a_box_remembered_by_one_process_is_read_by_another(redis_server):
    one = RedisPromptMemory(redis_server.url, ttl_s=60)
    other = RedisPromptMemory(redis_server.url, ttl_s=60)  # its own local memory: empty
    item = remembered()
    one.put(KEY, item)
    got = other.get(KEY)
    assert got is not None and same(got, item)
    assert other.get((8, "image", "car")) is None and other.get((7, "image", "person")) is None
    # one namespaced key per object, expiring with PROMPT_MEMORY_S
    client = one._client
    (name,) = client.keys(PREFIX + "*")
    assert name.decode() == redis_key(KEY) and 0 < client.pttl(name) <= 60_000
    # a click on a task with no box: no box, no logits (and the clicks it was computed from)
    one.put(KEY, Remembered(None, frozenset({(1.0, 2.0, 1)}), None, time.monotonic()))
    got = other.get(KEY)
    assert got.box is None and got.logits is None and got.points == {(1.0, 2.0, 1)}


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"\x00\x00\x00\x05{}",
        b"\xff\xff\xff\xff",
        encode(remembered(), 1.0)[:-3],  # truncated logits
        encode(remembered(), 1.0).replace(b'"<f4"', b'"|O8"'),  # object arrays would unpickle
        encode(remembered(), 1.0).replace(b"[1,64,64]", b"[1,64,65]"),
        encode(remembered(), 1.0).replace(b'"v":%d' % FORMAT, b'"v":9'),
        encode(remembered(), 1.0).replace(b"10.0,", b"NaN, "),
    ],
)
def test_values_this_backend_did_not_write_are_misses(value):
    assert decode(value) is None


def test_a_foreign_value_in_redis_falls_back_to_the_local_memory(redis_server):
    memory = RedisPromptMemory(redis_server.url, ttl_s=60)
    item = remembered()
    memory.put(KEY, item)
    memory._client.set(redis_key(KEY), b"not ours")
    assert same(memory.get(KEY), item)  # this process's own copy


def test_redis_down_clicks_use_local_memory_with_one_warning_then_share_again(redis_server, caplog):
    caplog.set_level(logging.INFO, "label_studio_sam2.redis")
    url = redis_server.url.replace("redis://", "redis://:hunter2secret@")
    redis_server.stop()
    # the password is refused by a server without one: reach it without, but log with one below
    memory = RedisPromptMemory(redis_server.url, ttl_s=60, retry_s=0.3)
    memory._password = "hunter2secret"
    other = RedisPromptMemory(url, ttl_s=60, retry_s=0.3)
    item = remembered()
    start = time.monotonic()
    memory.put(KEY, item)
    for _ in range(5):
        assert same(memory.get(KEY), item)  # the local copy answers
        time.sleep(0.1)  # across a retry: still the same outage
    assert time.monotonic() - start < 2.0
    assert other.get(KEY) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, [r.getMessage() for r in warnings]  # one per process
    assert all("unreachable" in r.getMessage() for r in warnings)
    assert "hunter2secret" not in caplog.text and str(redis_server.port) in caplog.text

    redis_server.start()
    time.sleep(0.35)
    newer = remembered(1)
    memory.put(KEY, newer)
    shared = RedisPromptMemory(redis_server.url, ttl_s=60)
    assert same(shared.get(KEY), newer)
    assert sum("is back;" in r.getMessage() for r in caplog.records) == 1


def test_the_newest_copy_wins_after_an_outage_that_kept_redis_data(redis_server):
    memory = RedisPromptMemory(redis_server.url, ttl_s=60, retry_s=0.2)
    other = RedisPromptMemory(redis_server.url, ttl_s=60, retry_s=0.2)
    memory.put(KEY, remembered(0, box=(1.0, 1.0, 2.0, 2.0)))
    redis_server.process.send_signal(signal.SIGSTOP)  # Redis frozen: its data stays
    try:
        memory.put(KEY, remembered(1, box=(5.0, 5.0, 9.0, 9.0)))  # only in this process
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    time.sleep(0.25)
    assert memory.get(KEY).box == (5.0, 5.0, 9.0, 9.0)  # not Redis's older box
    other.put(KEY, remembered(2, box=(3.0, 3.0, 4.0, 4.0)))  # a later box, drawn on another replica
    assert memory.get(KEY).box == (3.0, 3.0, 4.0, 4.0)


def test_a_redis_that_never_answers_costs_one_second_then_nothing(caplog):
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    held = []
    threading.Thread(target=lambda: held.append(silent.accept()), daemon=True).start()
    memory = RedisPromptMemory(f"redis://127.0.0.1:{silent.getsockname()[1]}/0", ttl_s=60)
    item = remembered()
    try:
        start = time.monotonic()
        memory.put(KEY, item)
        first = time.monotonic() - start
        start = time.monotonic()
        assert same(memory.get(KEY), item)
        second = time.monotonic() - start
    finally:
        silent.close()
    assert 0.5 < first < 2.5 and second < 0.1
    assert sum("unreachable" in r.getMessage() for r in caplog.records) == 1


def test_a_redis_url_that_is_not_one_is_refused_at_startup_without_its_password():
    with pytest.raises(SettingsError) as e:
        Settings.from_env(redis_url="http://:hunter2secret@redis:6379/0")
    assert "REDIS_URL" in str(e.value) and "hunter2secret" not in str(e.value)
    assert Settings.from_env(redis_url="rediss://:pw@redis:6380/1").redis_url.startswith("rediss://")
