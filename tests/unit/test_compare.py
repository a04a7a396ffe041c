"""jobs.compare without a render: the paired bootstrap intervals against a direct computation,
the --run spec, when identity scores compare, and the refusals that need no stored run."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from jobs.compare import main as compare_main
from pipeline.metrics import compare
from pipeline.metrics.compare import (
    CompareRefused,
    Run,
    RunRef,
    identity_comparable,
    mean_difference,
    paired_interval,
    parse_run_spec,
    win_rate,
)


def _direct(a: np.ndarray, b: np.ndarray, statistic, resamples: int, seed: int) -> tuple[float, float]:
    """The percentile interval by hand: resample pair indices with numpy, both scores of a pair together."""
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(a), (resamples, len(a)))
    values = statistic(a[index], b[index], axis=-1)
    low, high = np.quantile(values, [0.025, 0.975])
    return float(low), float(high)


@pytest.mark.parametrize("statistic", [mean_difference, win_rate])
def test_paired_intervals_equal_a_direct_resampling_of_pairs(statistic, monkeypatch):
    rng = np.random.default_rng(7)
    a = rng.normal(80, 3, 40)
    b = a + rng.normal(0.5, 2, 40)  # paired: b follows a pair by pair
    b[:3] = a[:3]  # ties (a win rate counts them half)
    figure = paired_interval(a, b, statistic, resamples=500, seed=3)
    assert figure["n"] == 40 and figure["value"] == pytest.approx(float(statistic(a, b)), rel=1e-12)
    assert (figure["low"], figure["high"]) == pytest.approx(_direct(a, b, statistic, 500, 3), rel=1e-12)
    assert figure["low"] < figure["value"] < figure["high"]
    # the paired interval is narrower than one that forgets the pairing (a and b resampled apart)
    rng = np.random.default_rng(3)
    apart = [statistic(a[rng.integers(0, 40, 40)], b[rng.integers(0, 40, 40)]) for _ in range(500)]
    if statistic is mean_difference:
        assert figure["high"] - figure["low"] < np.subtract(*np.quantile(apart, [0.975, 0.025]))
    # drawn in batches (a catalog-sized comparison's memory bound): the same draws, the same interval
    monkeypatch.setattr(compare, "BOOTSTRAP_CELLS", 40 * 7)
    assert paired_interval(a, b, statistic, resamples=500, seed=3) == pytest.approx(figure, rel=1e-12)


def test_one_pair_has_a_value_and_no_interval():
    assert paired_interval(np.array([1.0]), np.array([3.0]), mean_difference, resamples=200, seed=0) == {
        "n": 1,
        "value": 2.0,
        "low": None,
        "high": None,
    }


def test_run_specs():
    assert parse_run_spec("s3://renders/nov:RUN_A") == RunRef("s3://renders/nov", "RUN_A")
    assert parse_run_spec("/data/out/:r1") == RunRef("/data/out", "r1")
    for bad, says in [
        ("no-colon", "must be OUTPUT:RUN_ID"),
        (":r1", "must be OUTPUT:RUN_ID"),
        ("s3://renders/nov:", "run id '' must be"),
        ("out:a b", "run id 'a b' must be"),
    ]:
        with pytest.raises(CompareRefused, match=says):
            parse_run_spec(bad)


def _run(label: str, digest: str | None) -> Run:
    return Run(RunRef("out", label), label, {"model": {"digest": digest}}, {}, pa.table({"pair_id": ["p"]}))


def test_identity_compares_only_within_one_model():
    assert identity_comparable(_run("a", "d1"), _run("b", "d1")) is None
    note = identity_comparable(_run("a", "d1"), _run("pbe", "d2"))
    assert note.startswith("n/a: a and pbe are different models (digest d1 vs d2)") and "own image encoder" in note
    assert identity_comparable(_run("a", None), _run("b", None)).startswith("n/a")  # unknown is not the same


@pytest.mark.parametrize(
    "flags, says",
    [
        ([], "compare needs two or more --run, got 0"),
        (["--run", "{out}:a"], "compare needs two or more --run, got 1"),
        (["--run", "{out}:a", "--run", "nocolon"], "--run 'nocolon' must be OUTPUT:RUN_ID"),
        (["--run", "{out}:a", "--run", "{out}:a"], "given more than once"),
        (["--run", "{out}:a", "--run", "{out}:b"], "run {out}:a: no run record {out}/runs/a.json"),
        (["--run", "{out}:a", "--run", "{out}:b", "--resamples", "50"], "--resamples 50 is too few"),
    ],
)
def test_refusals_before_any_work(tmp_path, capsys, flags, says):
    out = tmp_path / "compare"
    assert compare_main([*(f.format(out=tmp_path) for f in flags), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says.format(out=tmp_path) in err
    assert not out.exists()
