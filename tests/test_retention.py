"""Table tests for the retention policy behind ``ckptsync prune``."""

from __future__ import annotations

import math

import pytest

from ckptsync import errors
from ckptsync.retention import (
    Decision,
    Item,
    Policy,
    PolicyError,
    format_duration,
    parse_duration,
    plan,
)

pytestmark = pytest.mark.laptop  # pure tables: the macOS and Windows jobs run them too

NOW = 1_700_000_000.0
MIN = 60.0
HOUR = 3600.0
DAY = 86400.0

DROP = ("not matched by any rule",)
NEWEST = "newest verified backup"
NONE_VERIFIES = "no backup verifies"
UNBACKED = "no verified local backup"
BUSY = "in progress"


def ck(name: str, step: int | None, age: float, **kw: object) -> Item:
    """An item ``age`` seconds old at NOW."""
    return Item(name=name, step=step, mtime=NOW - age, **kw)  # type: ignore[arg-type]


def steps(*numbers: int, **kw: object) -> list[Item]:
    """Items ckpt-<n>, one second older per step below the highest."""
    top = max(numbers)
    return [ck(f"ckpt-{n}", n, float(top - n), **kw) for n in numbers]


def table(decisions: list[Decision]) -> list[tuple[str, tuple[str, ...]]]:
    return [(d.item.name, d.reasons) for d in decisions]


# Each case: items, policy, plan() keyword arguments, expected decisions
# newest first as (name, reasons); DROP marks an item that is removed.
PLAN_CASES = {
    # ---- ordering and ties
    "last-k-orders-by-step-not-mtime": (
        [ck("ckpt-100", 100, 4 * HOUR), ck("ckpt-200", 200, 3 * HOUR),
         ck("ckpt-300", 300, 1 * HOUR), ck("ckpt-400", 400, 2 * HOUR)],
        Policy(keep_last=2),
        {"remote": True},
        [("ckpt-400", ("last 2",)), ("ckpt-300", ("last 2",)),
         ("ckpt-200", DROP), ("ckpt-100", DROP)],
    ),
    "last-k-orders-by-mtime-when-a-step-is-missing": (
        [ck("ckpt-100", 100, 3 * HOUR), ck("final", None, 1 * HOUR), ck("ckpt-300", 300, 2 * HOUR)],
        Policy(keep_last=1),
        {"remote": True},
        [("final", ("last 1",)), ("ckpt-300", DROP), ("ckpt-100", DROP)],
    ),
    "tie-same-step-newer-mtime-wins": (
        [ck("ckpt-500-rerun", 500, 1 * HOUR), ck("ckpt-500", 500, 2 * HOUR),
         ck("ckpt-400", 400, 0)],
        Policy(keep_last=1),
        {"remote": True},
        [("ckpt-500-rerun", ("last 1",)), ("ckpt-500", DROP), ("ckpt-400", DROP)],
    ),
    "tie-same-step-and-mtime-name-decides": (
        [ck("a", 500, HOUR), ck("c", 400, 0), ck("b", 500, HOUR)],
        Policy(keep_last=1),
        {"remote": True},
        [("b", ("last 1",)), ("a", DROP), ("c", DROP)],
    ),
    "tie-same-mtime-without-steps-name-decides": (
        [ck("run-x1", None, HOUR), ck("run-x2", None, HOUR), ck("run-x0", None, 2 * HOUR)],
        Policy(keep_last=1),
        {"remote": True},
        [("run-x2", ("last 1",)), ("run-x1", DROP), ("run-x0", DROP)],
    ),
    "last-k-larger-than-store-keeps-all": (
        steps(100, 200),
        Policy(keep_last=5),
        {"remote": True},
        [("ckpt-200", ("last 5",)), ("ckpt-100", ("last 5",))],
    ),
    "last-k-counts-complete-items-only": (
        [ck("ckpt-100", 100, 3 * HOUR), ck("ckpt-200", 200, 2 * HOUR),
         ck("ckpt-300", 300, 0, complete=False)],
        Policy(keep_last=1),
        {"remote": True},
        [("ckpt-300", (BUSY,)), ("ckpt-200", ("last 1",)), ("ckpt-100", DROP)],
    ),
    # ---- best
    "best-that-is-also-the-oldest": (
        [ck("ckpt-100", 100, 3 * HOUR, is_best=True), ck("ckpt-200", 200, 2 * HOUR),
         ck("ckpt-300", 300, 1 * HOUR)],
        Policy(keep_last=1, keep_best=True),
        {"remote": True},
        [("ckpt-300", ("last 1",)), ("ckpt-200", DROP), ("ckpt-100", ("best",))],
    ),
    "best-by-kind": (
        [ck("best", None, 5 * HOUR, kind="best"), ck("ckpt-200", None, 1 * HOUR)],
        Policy(keep_best=True),
        {"remote": True},
        [("ckpt-200", DROP), ("best", ("best",))],
    ),
    "best-ignored-without-keep-best": (
        [ck("ckpt-100", 100, 3 * HOUR, is_best=True), ck("ckpt-200", 200, 1 * HOUR)],
        Policy(keep_last=1),
        {"remote": True},
        [("ckpt-200", ("last 1",)), ("ckpt-100", DROP)],
    ),
    "best-several-and-newest-also-last": (
        [ck("ckpt-100", 100, 3 * HOUR, is_best=True), ck("ckpt-200", 200, 2 * HOUR),
         ck("ckpt-300", 300, 1 * HOUR, is_best=True)],
        Policy(keep_last=1, keep_best=True),
        {"remote": True},
        [("ckpt-300", ("last 1", "best")), ("ckpt-200", DROP), ("ckpt-100", ("best",))],
    ),
    # ---- milestones (keep_every)
    "milestone-step-exactly-on-multiple-and-step-0": (
        steps(0, 500, 1000, 1500, 2000, 2500),
        Policy(keep_every=1000),
        {"remote": True},
        [("ckpt-2500", DROP), ("ckpt-2000", ("milestone 2000",)), ("ckpt-1500", DROP),
         ("ckpt-1000", ("milestone 1000",)), ("ckpt-500", DROP), ("ckpt-0", DROP)],
    ),
    "milestone-first-in-bucket-when-none-on-multiple": (
        steps(900, 1100, 1900, 3050, 3999),
        Policy(keep_every=1000),
        {"remote": True},
        [("ckpt-3999", DROP), ("ckpt-3050", ("milestone 3000",)), ("ckpt-1900", DROP),
         ("ckpt-1100", ("milestone 1000",)), ("ckpt-900", DROP)],
    ),
    "milestone-two-in-bucket-lowest-step-wins": (
        steps(1999, 1001),
        Policy(keep_every=1000),
        {"remote": True},
        [("ckpt-1999", DROP), ("ckpt-1001", ("milestone 1000",))],
    ),
    "milestone-empty-buckets-keep-nothing": (
        steps(1000, 5000, 5999),
        Policy(keep_every=1000),
        {"remote": True},
        [("ckpt-5999", DROP), ("ckpt-5000", ("milestone 5000",)),
         ("ckpt-1000", ("milestone 1000",))],
    ),
    "milestone-all-below-first-multiple": (
        steps(0, 10, 999),
        Policy(keep_every=1000),
        {"remote": True},
        [("ckpt-999", DROP), ("ckpt-10", DROP), ("ckpt-0", DROP)],
    ),
    "milestone-every-1-step-0-is-not-a-milestone": (
        steps(0, 1, 2),
        Policy(keep_every=1),
        {"remote": True},
        [("ckpt-2", ("milestone 2",)), ("ckpt-1", ("milestone 1",)), ("ckpt-0", DROP)],
    ),
    "milestone-duplicate-step-newer-copy-wins": (
        [ck("ckpt-2000", 2000, 3 * HOUR), ck("ckpt-2000-rerun", 2000, 1 * HOUR),
         ck("ckpt-2500", 2500, 2 * HOUR)],
        Policy(keep_every=1000),
        {"remote": True},
        [("ckpt-2500", DROP), ("ckpt-2000-rerun", ("milestone 2000",)), ("ckpt-2000", DROP)],
    ),
    "milestone-skips-incomplete-item": (
        [ck("ckpt-1000", 1000, 0, complete=False), ck("ckpt-1200", 1200, HOUR)],
        Policy(keep_every=1000),
        {"remote": True},
        [("ckpt-1200", ("milestone 1000",)), ("ckpt-1000", (BUSY,))],
    ),
    "milestone-ignores-items-without-step-and-uses-step-under-mtime-order": (
        [ck("final", None, 0), ck("ckpt-1500", 1500, 3 * HOUR), ck("ckpt-1000", 1000, 1 * HOUR)],
        Policy(keep_every=1000),
        {"remote": True},
        [("final", DROP), ("ckpt-1000", ("milestone 1000",)), ("ckpt-1500", DROP)],
    ),
    # ---- keep_within
    "within-boundary-is-exclusive": (
        [ck("future", 5, -MIN), ck("now", 4, 0), ck("almost-1d", 3, DAY - 1),
         ck("exactly-1d", 2, DAY), ck("old", 1, 2 * DAY)],
        Policy(keep_within=DAY),
        {"remote": True},
        [("future", ("within 1d",)), ("now", ("within 1d",)), ("almost-1d", ("within 1d",)),
         ("exactly-1d", DROP), ("old", DROP)],
    ),
    "within-label-compound-duration": (
        [ck("a", None, HOUR), ck("b", None, 2 * HOUR)],
        Policy(keep_within=90 * MIN),
        {"remote": True},
        [("a", ("within 1h30m",)), ("b", DROP)],
    ),
    # ---- union
    "union-lists-every-reason": (
        [ck("ckpt-1000", 1000, 10 * DAY, is_best=True), ck("ckpt-1500", 1500, 5 * DAY),
         ck("ckpt-2000", 2000, 1 * DAY), ck("ckpt-2500", 2500, DAY / 2)],
        Policy(keep_last=1, keep_best=True, keep_every=1000, keep_within=2 * DAY),
        {},
        [("ckpt-2500", ("last 1", "within 2d", NEWEST)),
         ("ckpt-2000", ("milestone 2000", "within 2d")),
         ("ckpt-1500", DROP), ("ckpt-1000", ("best", "milestone 1000"))],
    ),
    # ---- safety: local stores
    "local-newest-verified-kept-when-newest-fails-verification": (
        [ck("ckpt-100", 100, 3 * HOUR), ck("ckpt-200", 200, 2 * HOUR),
         ck("ckpt-300", 300, 1 * HOUR, verified=False)],
        Policy(keep_last=1),
        {},
        [("ckpt-300", ("last 1",)), ("ckpt-200", (NEWEST,)), ("ckpt-100", DROP)],
    ),
    "local-newest-verified-is-older-than-every-rule": (
        [ck("ckpt-100", 100, 3 * HOUR), ck("ckpt-200", 200, 2 * HOUR, verified=False),
         ck("ckpt-300", 300, 1 * HOUR, verified=False)],
        Policy(keep_last=1),
        {},
        [("ckpt-300", ("last 1",)), ("ckpt-200", DROP), ("ckpt-100", (NEWEST,))],
    ),
    "local-nothing-verified-keeps-everything": (
        steps(100, 200, 300, verified=False),
        Policy(keep_last=1),
        {},
        [("ckpt-300", ("last 1", NONE_VERIFIES)), ("ckpt-200", (NONE_VERIFIES,)),
         ("ckpt-100", (NONE_VERIFIES,))],
    ),
    "local-backup-in-progress-is-kept-and-not-the-newest-verified": (
        [ck("ckpt-100", 100, 3 * HOUR), ck("ckpt-200", 200, 2 * HOUR),
         ck("ckpt-300", 300, 0, complete=False)],
        Policy(keep_last=1),
        {},
        [("ckpt-300", (BUSY,)), ("ckpt-200", ("last 1", NEWEST)), ("ckpt-100", DROP)],
    ),
    "local-force-keeps-the-safety-rules": (
        [ck("ckpt-100", 100, 3 * HOUR), ck("ckpt-200", 200, 2 * HOUR, verified=False)],
        Policy(keep_best=True),
        {"force": True},
        [("ckpt-200", DROP), ("ckpt-100", (NEWEST,))],
    ),
    "local-unverified-old-items-are-not-protected": (
        [ck("ckpt-100", 100, 3 * HOUR, verified=False), ck("ckpt-200", 200, 2 * HOUR)],
        Policy(keep_last=1),
        {},
        [("ckpt-200", ("last 1", NEWEST)), ("ckpt-100", DROP)],
    ),
    # ---- safety: remote
    "remote-unbacked-kept": (
        [ck("ckpt-100", 100, 3 * HOUR, verified=False), ck("ckpt-200", 200, 2 * HOUR),
         ck("ckpt-300", 300, 1 * HOUR, verified=False)],
        Policy(keep_last=1),
        {"remote": True},
        [("ckpt-300", ("last 1", UNBACKED)), ("ckpt-200", DROP), ("ckpt-100", (UNBACKED,))],
    ),
    "remote-unbacked-removed-with-force": (
        [ck("ckpt-100", 100, 3 * HOUR, verified=False), ck("ckpt-200", 200, 2 * HOUR),
         ck("ckpt-300", 300, 1 * HOUR, verified=False)],
        Policy(keep_last=1),
        {"remote": True, "force": True},
        [("ckpt-300", ("last 1",)), ("ckpt-200", DROP), ("ckpt-100", DROP)],
    ),
    "remote-force-never-removes-in-progress": (
        [ck("ckpt-100", 100, 3 * HOUR), ck("ckpt-200", 200, 0, complete=False, verified=False)],
        Policy(keep_best=True),
        {"remote": True, "force": True},
        [("ckpt-200", (BUSY,)), ("ckpt-100", DROP)],
    ),
    "remote-in-progress-and-unbacked": (
        [ck("ckpt-100", 100, 3 * HOUR), ck("ckpt-200", 200, 0, complete=False, verified=False)],
        Policy(keep_best=True),
        {"remote": True},
        [("ckpt-200", (BUSY, UNBACKED)), ("ckpt-100", DROP)],
    ),
    "remote-has-no-newest-verified-rule": (
        steps(100, 200),
        Policy(keep_best=True),
        {"remote": True},
        [("ckpt-200", DROP), ("ckpt-100", DROP)],
    ),
}


@pytest.mark.parametrize(
    ("items", "policy", "kwargs", "expected"),
    list(PLAN_CASES.values()),
    ids=list(PLAN_CASES),
)
def test_plan(items, policy, kwargs, expected):
    decisions = plan(items, policy, NOW, **kwargs)
    assert table(decisions) == expected
    for decision in decisions:
        assert decision.keep == (decision.reasons != DROP)
    # The same items in any input order give the same plan.
    assert table(plan(list(reversed(items)), policy, NOW, **kwargs)) == expected
    # Every item comes back exactly once, as the same object.
    assert sorted(map(id, (d.item for d in decisions))) == sorted(map(id, items))


def test_kept_and_removed_names():
    items = steps(100, 200, 300, 400, 500)
    decisions = plan(items, Policy(keep_last=2), NOW)
    assert [d.item.name for d in decisions if d.keep] == ["ckpt-500", "ckpt-400"]
    assert [d.item.name for d in decisions if not d.keep] == ["ckpt-300", "ckpt-200", "ckpt-100"]


@pytest.mark.parametrize("kwargs", [{}, {"remote": True}, {"remote": True, "force": True}])
def test_empty_store(kwargs):
    assert plan([], Policy(keep_last=3), NOW, **kwargs) == []


@pytest.mark.parametrize("items", [[], steps(100, 200)], ids=["empty-store", "two-items"])
def test_empty_policy_refused(items):
    with pytest.raises(PolicyError) as excinfo:
        plan(items, Policy(), NOW)
    assert str(excinfo.value) == (
        "refusing to prune with an empty policy: "
        "give --keep-last, --keep-best, --keep-every or --keep-within"
    )


def test_policy_error_is_a_value_error_and_a_usage_error():
    assert issubclass(PolicyError, ValueError)
    assert issubclass(PolicyError, errors.UsageError)
    assert PolicyError("x").exit_code == errors.USAGE


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keep_last": -1}, "--keep-last must not be negative"),
        ({"keep_every": -1000}, "--keep-every must not be negative"),
        ({"keep_within": -1.0}, "--keep-within must not be negative"),
        ({"keep_within": math.nan}, "--keep-within must be finite"),
        ({"keep_within": math.inf}, "--keep-within must be finite"),
        ({"keep_last": 1.5}, "--keep-last must be a whole number"),
        ({"keep_every": True}, "--keep-every must be a whole number"),
        ({"keep_within": "7d"}, "--keep-within must be a duration in seconds"),
    ],
)
def test_bad_policy_numbers(kwargs, message):
    with pytest.raises(PolicyError, match=message):
        Policy(**kwargs)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("30m", 30 * MIN),
        ("12h", 12 * HOUR),
        ("7d", 7 * DAY),
        ("2w", 14 * DAY),
        ("1h30m", 90 * MIN),
        ("1d12h", 36 * HOUR),
        ("1w2d3h4m5s", 9 * DAY + 3 * HOUR + 4 * MIN + 5),
        ("0h30m", 30 * MIN),
        ("1.5h", 90 * MIN),
        (".5m", 30),
        ("  7d\n", 7 * DAY),
        ("1s", 1),
    ],
)
def test_parse_duration_good(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty duration"),
        ("   ", "empty duration"),
        ("0", "has no unit"),
        ("30", "has no unit"),
        ("1h30", "has no unit"),
        ("1.d", "has no unit"),
        ("0s", "must be longer than zero"),
        ("0d0h", "must be longer than zero"),
        ("7x", "unknown unit 'x'"),
        ("7D", "unknown unit 'D'"),
        ("1dd", "unknown unit 'dd'"),
        ("1e3s", "unknown unit 'e'"),
        ("1h1h", "unit 'h' given twice"),
        ("30m1h", "largest to smallest"),
        ("-1d", "invalid duration"),
        ("1 h", "invalid duration"),
        ("h", "invalid duration"),
        ("inf", "invalid duration"),
        ("9" * 400 + "s", "too large"),
        (None, "invalid duration"),
    ],
)
def test_parse_duration_bad(text, message):
    with pytest.raises(PolicyError, match=message):
        parse_duration(text)


@pytest.mark.parametrize("text", ["", "30", "7x", "-1d"])
def test_parse_duration_error_shows_examples(text):
    with pytest.raises(PolicyError, match=r"e\.g\. 90s, 30m, 12h, 1h30m, 7d, 2w"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (7 * DAY, "7d"),
        (14 * DAY, "14d"),
        (12 * HOUR, "12h"),
        (30 * MIN, "30m"),
        (90, "1m30s"),
        (90 * MIN, "1h30m"),
        (DAY + 1, "1d1s"),
        (59, "59s"),
        (0, "0s"),
        (0.5, "0.5s"),
        (-HOUR, "-1h"),
    ],
)
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(
    "seconds", [1, 59, 60, 3599, 3600, 5400, 86399, 86400, 7 * DAY + 1, 400 * DAY]
)
def test_format_then_parse_round_trips(seconds):
    assert parse_duration(format_duration(seconds)) == seconds
