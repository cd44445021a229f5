"""What the server answers, as values: core code reads these, never a frame or a dict from the wire."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stat:
    """One path on the server, as os.stat saw it (symlinks followed)."""

    size: int
    mtime_ns: int
    mode: int
    is_dir: bool = False
    ctime_ns: int = 0                # 0: not reported
    inode: int = 0

    def same_content_stamp(self, other: "Stat") -> bool:
        """Size, mtime and (where both sides know it) inode match. ctime is left out: a chmod or
        a hard link of the file changes it, not the bytes; quick_check uses it to hash, not to judge."""
        return ((self.size, self.mtime_ns) == (other.size, other.mtime_ns)
                and not (self.inode and other.inode and self.inode != other.inode))


def same_identity(a, b) -> bool:
    """Same inode and ctime, where both are known: a rename or a rewrite changes one of them."""
    if a.inode and b.inode and a.inode != b.inode:
        return False
    return not (a.ctime_ns and b.ctime_ns and a.ctime_ns != b.ctime_ns)


@dataclass(frozen=True)
class FileStat:
    """A regular file found by a scan, relative to the scanned root."""

    path: str
    size: int
    mtime_ns: int
    mode: int
    ctime_ns: int = 0                # 0: not reported (an older agent, or not a scan)
    inode: int = 0

    @property
    def stat(self) -> Stat:
        return Stat(self.size, self.mtime_ns, self.mode, False, self.ctime_ns, self.inode)


@dataclass
class Listing:
    root: str                        # the directory as the server resolved it (absolute)
    files: list[FileStat]
    meta: dict                       # path -> parsed trainer_state.json, metadata.json, pickle summary
    now: float                       # the server's clock when it listed
    errors: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)   # path the server user may not read -> why


@dataclass(frozen=True)
class Hello:
    protocol: int
    python: str
    zstd: str | None                 # "module", "binary" or None
    hashes: tuple[str, ...]          # best first
    hostname: str = ""
    home: str = ""
    now: float = 0.0
    lzma: bool = True                # can unpack lzma lanes (some Pythons are built without it)
    pid: int = 0                     # the agent's process on the server


@dataclass(frozen=True)
class Space:
    free: int                        # bytes an unprivileged writer may use
    path: str                        # the existing directory that was measured


@dataclass
class Procs:
    matched: list[tuple[int, str]]           # processes whose command line contains the configured pattern
    gpu: list[str] | None                    # nvidia-smi's compute apps; None when it could not be asked
    open_under: list[tuple[int, str, str]]   # (pid, command, path) of files open under the checked root
    open_checked: bool                       # False when /proc could not be read for open files
    open_error: str
    trainers: list[tuple[int, str]]          # python processes whose command line names a trainer


@dataclass
class Staged:
    """What an interrupted upload left in staging on the server."""

    files: dict[str, Stat]           # member -> size, mtime_ns (mode 0: not reported)
    partial: set[str]                # members left half-written


@dataclass
class Committed:
    moved: list[str]
    kept: list[str]                  # destinations that already existed and were left alone


@dataclass(frozen=True)
class Arrived:
    """One file an upload wrote into staging, with the hash the server computed."""

    member: str
    size: int
    hash: str
