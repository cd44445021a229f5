"""How the files of one transfer are shared out between channels: about the same bytes each,
a large file split into byte ranges where one share ends and the next begins. Pure."""

from __future__ import annotations

from dataclasses import dataclass

SPLIT_MIN = 64 << 20   # only a file at least this large is split into ranges
RANGE_MIN = 16 << 20   # and none of its ranges is shorter than this


@dataclass(frozen=True)
class Piece:
    """One file of a share, or one byte range of it (`start` set)."""

    source: str
    member: str
    start: int | None = None
    length: int = 0


def plan(files: list[tuple[str, str, int]], n: int, kept: dict[str, int] | None = None,
         split_min: int | None = None, range_min: int | None = None, split: bool = True) -> list[list[Piece]]:
    """`n` shares of `files` ((source, member, size), kept in their order).

    The files are laid end to end and the line is cut at every n-th of its bytes. A file of at
    least `split_min` bytes that a cut crosses is split there into ranges, none shorter than
    `range_min` (a cut closer than that to another is dropped); every other file goes whole to
    the share holding its middle. The ranges of one file therefore go to different shares.
    `kept`: member -> bytes of a kept prefix, not sent again and so not counted; they belong to
    the file's first range, which starts at 0. `split=False`: whole files only.
    """
    kept = kept or {}
    split_min = SPLIT_MIN if split_min is None else split_min
    range_min = max(RANGE_MIN if range_min is None else range_min, 1)
    shares: list[list[Piece]] = [[] for _ in range(max(n, 1))]
    weights = [max(size - kept.get(member, 0), 0) for _source, member, size in files]
    total = sum(weights)
    if n <= 1 or total == 0:
        shares[0] = [Piece(source, member) for source, member, _size in files]
        return shares
    step = total / n
    at = 0   # bytes laid out before this file
    for (source, member, size), weight in zip(files, weights):
        cuts: list[tuple[int, int]] = []   # (k, bytes into the file to send) for the cut at k * step
        if split and weight >= split_min:
            last = 0
            for k in range(1, n):
                x = int(k * step - at)
                if x - last >= range_min and weight - x >= range_min:
                    cuts.append((k, x))
                    last = x
        if not cuts:
            shares[min(int((at + weight / 2) // step), n - 1)].append(Piece(source, member))
        else:
            base = size - weight
            edges = [0] + [x for _k, x in cuts] + [weight]
            owners = [k - 1 for k, _x in cuts] + [cuts[-1][0]]
            for i, owner in enumerate(owners):
                lo = 0 if i == 0 else base + edges[i]
                shares[owner].append(Piece(source, member, lo, base + edges[i + 1] - lo))
        at += weight
    return shares
