"""A manifest: what one entry of a store holds, file by file, and how it is read back.

A store of any kind (a directory, an archive, a bucket) keeps one per entry; the rules for
trusting one (`read_manifest`) are the same everywhere.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

FORMAT = 1
EXTRA = "extra-files"   # the entry that holds the configured extra files


@dataclass
class FileRecord:
    path: str          # relative to the backup directory, e.g. "checkpoint-8/optimizer.pt"
    size: int
    mode: int
    mtime_ns: int
    xxh3_128: str
    source: str = ""   # for extra files: the path as configured, relative to remote_dir
    ctime_ns: int = 0  # the server file's ctime and inode when backed up (0: not recorded)
    inode: int = 0
    # The same bytes in other algorithms (sha1: what a server without xxhash computes), recorded
    # when first needed (digests.py). Not part of a record's identity: the bytes are the same.
    hashes: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Verified:
    """One file a transfer verified into staging, as `NAME.progress.json` records it: its stamps as
    received, its xxh3-128 (and `hashes`, the server's algorithm where that differs), the listing's
    inode and ctime it was checked against (0: not recorded), and how it was placed from the store
    ("": it was fetched)."""

    size: int
    mode: int
    mtime_ns: int
    xxh3_128: str
    inode: int = 0
    ctime_ns: int = 0
    placed: str = ""
    hashes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out: dict = {"size": self.size, "mode": self.mode, "mtime_ns": self.mtime_ns,
                     "xxh3_128": self.xxh3_128, "inode": self.inode, "ctime_ns": self.ctime_ns}
        if self.placed:
            out["placed"] = self.placed
        out["hashes"] = dict(self.hashes)
        return out

    @classmethod
    def from_dict(cls, data: Any) -> "Verified | None":
        """A record as any version wrote it (inode, ctime, placed and hashes came later); None when
        it is not one."""
        if not isinstance(data, dict):
            return None
        ints = {k: data.get(k, 0) for k in ("size", "mode", "mtime_ns", "inode", "ctime_ns")}
        texts = {k: data.get(k, "") for k in ("xxh3_128", "placed")}
        hashes = data.get("hashes") or {}
        if any(k not in data for k in ("size", "mode", "mtime_ns", "xxh3_128")) \
                or not all(type(v) is int for v in ints.values()) or not all(isinstance(v, str) for v in texts.values()) \
                or not isinstance(hashes, dict) or not all(isinstance(v, str) for v in hashes.values()):
            return None
        return cls(**ints, **texts, hashes=dict(hashes))

    def as_file(self, f: FileRecord) -> FileRecord:
        """The planned manifest's record of this file, finished with what was verified."""
        return replace(f, size=self.size, mode=self.mode, mtime_ns=self.mtime_ns, xxh3_128=self.xxh3_128,
                       hashes=dict(self.hashes))


@dataclass
class Manifest:
    name: str
    layout: str
    kind: str
    step: int | None
    files: list[FileRecord]
    resume_files: list[str] = field(default_factory=list)
    resumable: bool = False
    content: str = "unknown"
    missing: list[str] = field(default_factory=list)
    is_best: bool = False
    state: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    backed_up_at: float = 0.0
    verified_at: float = 0.0
    format: int = FORMAT

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def mtime(self) -> float:
        return max((f.mtime_ns for f in self.files), default=0) / 1e9

    def to_dict(self) -> dict:
        # What dataclasses.asdict gives, built directly: asdict copies every value of every file
        # record one by one, a measurable share of a backup of many small checkpoints.
        return {k: [_file_dict(f) for f in v] if k == "files" else copy.deepcopy(v) for k, v in vars(self).items()}

    def to_json(self) -> str:
        """Each field on a line of its own, and each file's record: as readable as an indented
        dump, and made by json's C encoder, which takes no indent (0.6 of the time for 8 files)."""
        fields = self.to_dict()
        lines = []
        for key in sorted(fields):
            if key == "files" and fields[key]:
                records = ",\n  ".join(_ENCODE(f) for f in fields[key])
                lines.append(f' "files": [\n  {records}\n ]')
            else:
                lines.append(f" {_ENCODE(key)}: {_ENCODE(fields[key])}")
        return "{\n" + ",\n".join(lines) + "\n}"

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        fields = FileRecord.__dataclass_fields__
        files = [FileRecord(**{k: v for k, v in f.items() if k in fields}) for f in data.pop("files")]
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(files=files, **known)



def _file_dict(f: FileRecord) -> dict:
    out = {k: getattr(f, k) for k in _FILE_FIELDS}
    if f.hashes:   # a record with xxh3-128 only reads as it did before hashes existed
        out["hashes"] = dict(f.hashes)
    return out


_FILE_FIELDS = tuple(k for k in FileRecord.__dataclass_fields__ if k != "hashes")
_ENCODE = json.JSONEncoder(sort_keys=True).encode


class DamagedManifest(ValueError):
    """A manifest file that is there but cannot be trusted; the message says why."""


def read_manifest(path: Path, name: str) -> Manifest:
    """The manifest at `path`, which must describe entry `name` and only files inside it.

    FileNotFoundError when there is none; DamagedManifest when there is one that is cut short,
    not JSON, not a manifest, about another entry, or listing a path outside the entry."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise DamagedManifest(f"cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    return parse_manifest(text, name)


def parse_manifest(text: str, name: str) -> Manifest:
    """A manifest's text, which must describe entry `name` and only files inside it (DamagedManifest if not)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        cut = "cut short: " if not text.rstrip().endswith("}") else ""
        raise DamagedManifest(f"{cut}not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise DamagedManifest("not a manifest (expected a JSON object)")
    try:
        m = Manifest.from_dict(data)
    except (TypeError, KeyError, AttributeError, ValueError) as exc:
        raise DamagedManifest(f"not a whole manifest ({type(exc).__name__}: {exc})") from None
    if m.name != name:
        raise DamagedManifest(f"describes {m.name!r}, not {name!r}")
    for f in m.files:
        if not (isinstance(f.path, str) and _inside(f.path, name) and isinstance(f.size, int)
                and isinstance(f.xxh3_128, str)):
            raise DamagedManifest(f"lists a file outside {name}, or one without a size and checksum: {f.path!r}")
    return m


def _inside(path: str, name: str) -> bool:
    parts = path.split("/")
    return parts[0] == name and not path.startswith("/") and all(p not in ("", ".", "..") for p in parts)
