"""`_lock` on local files: atomic acquisition, takeover and fencing (pipeline/output/lock.py),
with real processes (tests/contenders.py) and the compare-and-swap under it (storage.put_if_match).
The same races on the S3 endpoint, and at job level, are tests/integration/test_lock.py."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
from contenders import (
    assert_fenced,
    assert_one_winner,
    crashed_holder,
    frozen_holder_taken_over,
    observer,
    race,
    wait_stale,
)

from pipeline import storage


@pytest.mark.slow  # eight processes race for the lock (seconds): `make test` runs it, `make test-unit` does not
def test_eight_contenders_at_once_one_acquires(tmp_path):
    outcomes, holder = race(str(tmp_path / "out"))
    assert_one_winner(outcomes, holder)
    assert os.listdir(tmp_path / "out") == []  # released; no temp or claim file left


@pytest.mark.slow  # eight processes wait out a stale lock (seconds): `make test` runs it, `make test-unit` does not
def test_eight_contenders_taking_over_one_crashed_holders_lock(tmp_path):
    output = str(tmp_path / "out")
    crashed_holder(output, "crashed", 2.0, str(tmp_path))
    assert wait_stale(output, 2.0)["run_id"] == "crashed"
    outcomes, holder = race(output, stale_after_s=2.0)
    assert_one_winner(outcomes, holder)
    assert os.listdir(output) == []


@pytest.mark.slow  # waits out a stale lock (seconds): `make test` runs it
def test_a_crashed_holders_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    output = str(tmp_path / "out")
    crashed_holder(output, "crashed", 1.0, str(tmp_path))
    wait_stale(output, 1.0)
    taker = observer(output, stale_after_s=1.0)
    with caplog.at_level(logging.WARNING, logger="pipeline.output.lock"), taker:
        assert taker.holder()["token"] == taker.token
    assert "took over the stale lock of run crashed" in caplog.text
    assert os.listdir(output) == []


@pytest.mark.parametrize("content", [b"", b'{"run_id": "half', b"[1, 2]"])
def test_an_unreadable_lock_counts_as_stale(tmp_path, caplog, content):
    output = str(tmp_path / "out")
    os.makedirs(output)
    with open(os.path.join(output, "_lock"), "wb") as f:
        f.write(content)
    with caplog.at_level(logging.WARNING, logger="pipeline.output.lock"), observer(output) as lock:
        assert lock.holder()["token"] == lock.token
    assert "took over the stale lock of run ?" in caplog.text


@pytest.mark.slow  # waits out a stale lock (seconds): `make test` runs it, `make test-unit` does not
def test_a_frozen_holder_taken_over_stops_at_its_fence_and_leaves_the_takers_lock(tmp_path):
    output = str(tmp_path / "out")
    report, taker, holder_after = frozen_holder_taken_over(output, 2.0, str(tmp_path))
    try:
        assert_fenced(report, taker, holder_after)
        taker.check("a part")  # the taker's own fence passes
    finally:
        taker.release()
    assert os.listdir(output) == []


def test_local_compare_and_swap(tmp_path):
    uri = str(tmp_path / "obj")
    v1 = storage.put_if_absent(uri, b"one")
    with pytest.raises(storage.PreconditionFailed):
        storage.put_if_absent(uri, b"other")
    assert storage.read_versioned(uri) == (b"one", v1)
    v2 = storage.put_if_match(uri, b"two", v1)
    with pytest.raises(storage.PreconditionFailed):  # a version, once replaced, is gone
        storage.put_if_match(uri, b"three", v1)
    with pytest.raises(storage.PreconditionFailed):
        storage.delete_if_match(uri, v1)
    assert storage.read_versioned(uri) == (b"two", v2)

    # A claim on v2 left by a writer that died inside its swap: waited for while fresh,
    # broken once older than stale_claim_s.
    claim = f"{uri}.cas-{v2[:32]}"
    with open(claim, "wb") as f:
        f.write(b"dead writer")
    with pytest.raises(storage.PreconditionFailed):
        storage.put_if_match(uri, b"three", v2, stale_claim_s=60)
    assert os.path.exists(claim) and storage.read_versioned(uri)[0] == b"two"
    old = time.time() - 120
    os.utime(claim, (old, old))
    v3 = storage.put_if_match(uri, b"three", v2, stale_claim_s=60)
    assert storage.read_versioned(uri) == (b"three", v3)
    storage.delete_if_match(uri, v3)
    with pytest.raises(FileNotFoundError):
        storage.read_versioned(uri)
    with pytest.raises(storage.PreconditionFailed):
        storage.delete_if_match(uri, v3)
    assert os.listdir(tmp_path) == []  # no temp, claim or trash file left


def test_the_record_names_the_holder(tmp_path):
    output = str(tmp_path / "out")
    with observer(output) as lock:
        record = json.loads(open(os.path.join(output, "_lock")).read())
        assert {k: record[k] for k in ("run_id", "pid", "token")} == {
            "run_id": "observer",
            "pid": os.getpid(),
            "token": lock.token,
        }
        lock.check("a part")  # renews: the record moves on, still ours
        assert json.loads(open(os.path.join(output, "_lock")).read())["gen"] > record["gen"]
    assert not os.path.exists(os.path.join(output, "_lock"))
