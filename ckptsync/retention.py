"""Retention policy behind ``ckptsync prune``: which checkpoints to keep.

Everything here is pure: :func:`plan` looks at a list of :class:`Item`
records and a :class:`Policy` and returns one :class:`Decision` per item.
Nothing touches the disk or the network; the caller deletes what is marked
``keep=False``.

Ordering ("newest")
    When every item has a step, items are ordered by ``(step, mtime, name)``;
    if any item lacks a step, all are ordered by ``(mtime, name)``. Larger is
    newer, so ties on step are broken by the later mtime, and ties on both by
    the name that sorts last. Decisions are returned newest first.

Rules (the policy is their union: an item is kept if ANY rule keeps it)
    ``keep_last K``
        The K newest *complete* items ("last K"). Incomplete items do not use
        up a slot; they are kept anyway (see safety below).
    ``keep_best``
        Every item with ``is_best`` set or ``kind == "best"`` ("best").
    ``keep_every S``
        Milestones at steps S, 2S, 3S, ... Bucket k (k >= 1) covers steps
        ``[k*S, (k+1)*S)``; in each non-empty bucket the complete item with
        the *lowest* step is kept ("milestone k*S"), i.e. the first
        checkpoint that reached the milestone. Equal steps are broken like
        the ordering above (the newer copy wins). Steps below S (including
        step 0) form no milestone, items without a step are never matched,
        and empty buckets keep nothing. Choosing the first checkpoint of a
        bucket rather than the last makes the result stable: later
        checkpoints never change which item stands for a finished milestone,
        so the outcome does not depend on how often ``prune`` is run, and a
        checkpoint at exactly step k*S is the one kept.
    ``keep_within D``
        Every item with ``mtime > now - D`` (strict: an item exactly D old is
        not kept) ("within 7d"). ``now`` must come from the same clock as the
        mtimes (for a server's checkpoints, the server's clock).

Safety (applied after the rules, whatever the policy says)
    * An incomplete item (still being written) is always kept
      ("in progress"). ``force`` does not change this.
    * Local stores (``remote=False``): the newest complete, verified item is
      always kept ("newest verified backup"), so a prune never leaves only
      backups that fail verification. When no complete item is verified,
      every item is kept ("no backup verifies").
    * Remote (``remote=True``): an item without a verified local backup
      (``verified=False``) is kept ("no verified local backup") unless
      ``force=True``.

A kept item lists every reason that applies, rules first, then safety; a
removed item has the single reason ``"not matched by any rule"``.

A policy with no rule set raises :class:`PolicyError` (checked before the
items, so an empty store does not hide a wrong command line); otherwise an
empty item list gives ``[]``.

Durations (``--keep-within``) are written as one or more ``<number><unit>``
parts with units ``w`` (7 days), ``d``, ``h``, ``m`` and ``s``, largest unit
first, each unit at most once: ``90s``, ``30m``, ``1h30m``, ``2w``, ``1.5d``.
A bare number is refused (the unit would be a guess), and so is a zero
duration: ``--keep-within 0s`` would keep nothing, which is never what
someone giving the flag means.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

from ckptsync.errors import UsageError
from ckptsync.policy import newest_first

__all__ = [
    "Decision",
    "Item",
    "Policy",
    "PolicyError",
    "format_duration",
    "parse_duration",
    "plan",
]

EMPTY_POLICY_MESSAGE = (
    "refusing to prune with an empty policy: "
    "give --keep-last, --keep-best, --keep-every or --keep-within"
)

REASON_UNMATCHED = "not matched by any rule"
REASON_BEST = "best"
REASON_IN_PROGRESS = "in progress"
REASON_NEWEST_VERIFIED = "newest verified backup"
REASON_NONE_VERIFIED = "no backup verifies"
REASON_NO_LOCAL_BACKUP = "no verified local backup"


class PolicyError(UsageError, ValueError):
    """A retention policy or duration that cannot be used (exit code: usage)."""


@dataclass(frozen=True)
class Item:
    """One checkpoint (server side) or one backup of it (local side)."""

    name: str
    step: int | None
    mtime: float
    is_best: bool = False
    complete: bool = True
    verified: bool = True
    kind: str = "rolling"


@dataclass(frozen=True)
class Policy:
    """The rules of ``ckptsync prune``; an item is kept if any rule keeps it."""

    keep_last: int = 0
    keep_best: bool = False
    keep_every: int = 0
    keep_within: float = 0.0

    def __post_init__(self) -> None:
        for field in ("keep_last", "keep_every"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int):
                raise PolicyError(f"{_flag(field)} must be a whole number, got {value!r}")
            if value < 0:
                raise PolicyError(f"{_flag(field)} must not be negative, got {value}")
        within = self.keep_within
        if isinstance(within, bool) or not isinstance(within, (int, float)):
            raise PolicyError(f"--keep-within must be a duration in seconds, got {within!r}")
        if not math.isfinite(within):
            raise PolicyError(f"--keep-within must be finite, got {within!r}")
        if within < 0:
            raise PolicyError(f"--keep-within must not be negative, got {format_duration(within)}")

    @property
    def is_empty(self) -> bool:
        return not (self.keep_last or self.keep_best or self.keep_every or self.keep_within)


@dataclass(frozen=True)
class Decision:
    """Whether one item stays, and every reason why (or why not)."""

    item: Item
    keep: bool
    reasons: tuple[str, ...]


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


# ---------------------------------------------------------------- durations

_UNITS: dict[str, int] = {"w": 7 * 86400, "d": 86400, "h": 3600, "m": 60, "s": 1}
_UNIT_ORDER = "wdhms"
_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)([a-zA-Z]*)")
_DURATION_HELP = "use a number and a unit (w, d, h, m, s), e.g. 90s, 30m, 12h, 1h30m, 7d, 2w"


def parse_duration(text: str) -> float:
    """Seconds in ``text`` such as ``"30m"``, ``"1h30m"`` or ``"2w"``.

    Raises :class:`PolicyError` for anything else, including a bare number,
    an unknown or repeated unit, units out of order and zero.
    """
    if not isinstance(text, str):
        raise PolicyError(f"invalid duration {text!r}: {_DURATION_HELP}")
    source = text.strip()
    if not source:
        raise PolicyError(f"empty duration: {_DURATION_HELP}")
    total = 0.0
    last_rank = -1
    pos = 0
    while pos < len(source):
        match = _PART.match(source, pos)
        if match is None:
            raise PolicyError(f"invalid duration {text!r}: {_DURATION_HELP}")
        number, unit = match.group(1), match.group(2)
        if not unit:
            raise PolicyError(
                f"invalid duration {text!r}: {number!r} has no unit; {_DURATION_HELP}"
            )
        if unit not in _UNITS:
            raise PolicyError(f"invalid duration {text!r}: unknown unit {unit!r}; {_DURATION_HELP}")
        rank = _UNIT_ORDER.index(unit)
        if rank == last_rank:
            raise PolicyError(f"invalid duration {text!r}: unit {unit!r} given twice")
        if rank < last_rank:
            raise PolicyError(
                f"invalid duration {text!r}: write units from largest to smallest (e.g. 1h30m)"
            )
        last_rank = rank
        total += float(number) * _UNITS[unit]
        pos = match.end()
    if not math.isfinite(total):
        raise PolicyError(f"invalid duration {text!r}: too large")
    if total <= 0:
        raise PolicyError(f"invalid duration {text!r}: must be longer than zero")
    return total


def format_duration(seconds: float) -> str:
    """A short form for messages: ``7d``, ``12h``, ``1h30m``, ``90s`` -> ``1m30s``.

    Whole seconds round-trip through :func:`parse_duration`. Days are the
    largest unit used (``14d``, not ``2w``); below one second the value is
    shown as is (``0.5s``).
    """
    if not math.isfinite(seconds):
        return "forever" if seconds > 0 else str(seconds)
    if seconds < 0:
        return "-" + format_duration(-seconds)
    whole = int(round(seconds))
    if whole == 0:
        return "0s" if seconds == 0 else f"{seconds:g}s"
    parts = []
    for unit in "dhms":
        count, whole = divmod(whole, _UNITS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


# --------------------------------------------------------------------- plan


def plan(
    items: Sequence[Item],
    policy: Policy,
    now: float,
    *,
    remote: bool = False,
    force: bool = False,
) -> list[Decision]:
    """Decide, for every item, whether ``policy`` keeps it; newest first.

    See the module docstring for the exact rules and safety nets.
    """
    if policy.is_empty:
        raise PolicyError(EMPTY_POLICY_MESSAGE)
    if not items:
        return []

    ordered = newest_first(items)
    reasons: list[list[str]] = [[] for _ in ordered]

    if policy.keep_last:
        label = f"last {policy.keep_last}"
        complete = [n for n, item in enumerate(ordered) if item.complete]
        for n in complete[: policy.keep_last]:
            reasons[n].append(label)

    if policy.keep_best:
        for n, item in enumerate(ordered):
            if item.is_best or item.kind == "best":
                reasons[n].append(REASON_BEST)

    if policy.keep_every:
        every = policy.keep_every
        candidates = [
            n
            for n, item in enumerate(ordered)
            if item.complete and item.step is not None and item.step >= every
        ]
        # Lowest step first, so the first item seen in a bucket has its
        # lowest step; among equal steps the newer copy comes later and wins.
        candidates.sort(key=lambda n: (ordered[n].step, ordered[n].mtime, ordered[n].name))
        first_in_bucket: dict[int, int] = {}
        for n in candidates:
            item = ordered[n]
            bucket = item.step // every
            chosen = first_in_bucket.get(bucket)
            if chosen is None or ordered[chosen].step == item.step:
                first_in_bucket[bucket] = n
        for bucket, n in first_in_bucket.items():
            reasons[n].append(f"milestone {bucket * every}")

    if policy.keep_within:
        label = f"within {format_duration(policy.keep_within)}"
        cutoff = now - policy.keep_within
        for n, item in enumerate(ordered):
            if item.mtime > cutoff:
                reasons[n].append(label)

    for n, item in enumerate(ordered):
        if not item.complete:
            reasons[n].append(REASON_IN_PROGRESS)

    if remote:
        if not force:
            for n, item in enumerate(ordered):
                if not item.verified:
                    reasons[n].append(REASON_NO_LOCAL_BACKUP)
    else:
        newest = next((n for n, item in enumerate(ordered) if item.complete and item.verified), None)
        for n, item in enumerate(ordered):
            if n == newest:
                reasons[n].append(REASON_NEWEST_VERIFIED)
            elif newest is None and item.complete:
                reasons[n].append(REASON_NONE_VERIFIED)

    decisions = []
    for item, why in zip(ordered, reasons):
        if why:
            decisions.append(Decision(item, True, tuple(why)))
        else:
            decisions.append(Decision(item, False, (REASON_UNMATCHED,)))
    return decisions
