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


class Stats(dict):
    """path -> Stat, or None when the server has no such path or could not look at it;
    `errors`: the paths it could not look at (a directory on the way it may not enter), and why."""

    def __init__(self, found: dict | None = None, errors: dict[str, str] | None = None) -> None:
        super().__init__(found or {})
        self.errors = dict(errors or {})


@dataclass(frozen=True)
class FileStat:
    """A regular file found by a scan, relative to the scanned root."""

    path: str
    size: int
    mtime_ns: int
    mode: int
    ctime_ns: int = 0                # 0: not reported (an older agent, or not a scan)
    inode: int = 0
    nlink: int = 0                   # names the file had (a held file has two: the trainer's and the hold's)

    @property
    def mtime(self) -> float:
        """Seconds since the epoch, by the server's clock (what the layout rules compare)."""
        return self.mtime_ns / 1e9

    @property
    def stat(self) -> Stat:
        return Stat(self.size, self.mtime_ns, self.mode, False, self.ctime_ns, self.inode)

    @property
    def stamp(self) -> list[int]:
        """What the agent compares an open file's fstat with: [size, mtime_ns, inode, ctime_ns], and
        the number of names of a file that has several (removing one moves only the ctime)."""
        return [self.size, self.mtime_ns, self.inode, self.ctime_ns] + ([self.nlink] if self.nlink > 1 else [])


@dataclass
class Listing:
    root: str                        # the directory as the server resolved it (absolute)
    files: list[FileStat]
    meta: dict                       # path -> parsed trainer_state.json, metadata.json, pickle summary
    now: float                       # the server's clock when it listed
    errors: list[str] = field(default_factory=list)
    unseen: list["Unseen"] = field(default_factory=list)      # what the scan could not list or read
    stopped: str = ""                # why the scan ended before it had listed everything; "" when it did not
    # With scan(holds=True): what .ckptsync-hold holds, paths <name>/<path under root>, and its parsed metadata.
    held: list[FileStat] = field(default_factory=list)
    held_meta: dict = field(default_factory=dict)
    links: list[str] = field(default_factory=list)           # symlinks the scan followed


@dataclass(frozen=True)
class Changes:
    """What a wait saw under the root: paths created, written, moved or deleted ("" for the root
    itself, or too many to name), and how it watched (inotify, or poll with the reason)."""

    changed: tuple[str, ...]
    how: str
    why: str = ""
    started: bool = False            # the first wait: watching began, nothing is reported yet


@dataclass
class Held:
    """What a hold request did: name -> its files as linked (new ctime), and name -> why not."""

    held: dict[str, list[FileStat]]
    refused: dict[str, str]


@dataclass(frozen=True)
class Unseen:
    """A path under the scanned root that the server's user could not list or read (a directory
    it may not enter, a dangling symlink, a tree nested too deep), and why."""

    path: str
    why: str
    mtime_ns: int = 0                # the entry's own mtime (a link's, a directory's); 0: not known


@dataclass(frozen=True)
class Hello:
    protocol: int
    python: str
    zstd: str | None                 # "module" (zstd in-process: zstandard or compression.zstd) or None
    hashes: tuple[str, ...]          # best first
    hostname: str = ""
    home: str = ""
    now: float = 0.0
    lzma: bool = True                # can unpack lzma lanes (some Pythons are built without it)
    offset: float = 0.0              # the server's clock minus this computer's when the hello arrived
    pid: int = 0                     # the agent's process on the server
    managed: bool = False            # its python3 is the distribution's: pip refuses to install (PEP 668)
    apt: bool = False                # apt-get is there
    root: bool = False               # the agent runs as root
    aes: bool | None = None          # its CPU has AES instructions; None: it did not say


@dataclass(frozen=True)
class Probe:
    """What the server's python3 offers, measured there on samples in memory."""

    python: str                      # version
    executable: str                  # the interpreter's path
    hash: str                        # what it hashes with (xxh3_128, else sha1)
    hash_rate: float                 # bytes per second
    codec: str                       # zstd-zstandard, zstd-stdlib or zlib-lanes
    codec_rate: float                # bytes per second packed at level 1; 0: not measured
    fd_readable: int                 # other processes whose open files this user can read
    fd_total: int                    # other processes


@dataclass(frozen=True)
class Space:
    free: int                        # bytes an unprivileged writer may use
    path: str                        # the existing directory that was measured
    total: int = 0                   # the filesystem's size; 0: not reported


@dataclass(frozen=True)
class Process:
    """A process the server reported: one of this run's, or one that looks like training."""

    pid: int
    cmd: str
    mine: bool                   # the server user's own
    run: str                     # why it is this run's ("works in DIR", "writes PATH", ...); "" when not
    trainer: bool                # a launcher, a program named for training, or matching train_process
    python: bool                 # a Python program (trainers often are, whatever their name)
    gpu: bool = False            # nvidia-smi lists it as a compute app
    seen: bool = True            # its working directory and open files could be read


@dataclass
class Procs:
    processes: list[Process]
    writing: list[tuple[int, str, str]]      # (pid, command, path) of files open for writing under the root
    gpu: list[str] | None                    # nvidia-smi's compute apps; None when it could not be asked
    blind: list[str] = field(default_factory=list)   # what the server could not see, a reason each
    now: float = 0.0                 # the server's clock when it looked (0: not reported)
    complete: bool = True            # every file open for writing is in `writing` (not cut at the limit)
    root: str = ""                   # the root as the server resolved it (symlinks too): `writing` is under it


@dataclass
class Staged:
    """What an interrupted upload left in staging on the server."""

    files: dict[str, Stat]           # member -> size, mtime_ns (mode 0: not reported)
    partial: set[str]                # members left half-written


@dataclass
class Committed:
    moved: list[str]
    kept: list[str]                  # destinations that already existed and were left alone
    staging_left: bool = True        # the staging still holds something (else the commit removed it)


@dataclass(frozen=True)
class Sent:
    """What the server said of one file of a send once it had read it: the bytes it sent (`size`,
    `hash` in the send's algorithm, `offset` of them kept by the receiver), the file's stamps as
    opened, and for a byte range its `start` and the whole file's `file_size`. `changed`: why the
    bytes are not the listed file's; `error` (with its `kind`, e.g. not_found): why it was not sent."""

    member: str
    size: int = 0
    hash: str = ""
    mtime_ns: int = 0
    mode: int = 0
    offset: int = 0
    start: int | None = None
    file_size: int = 0
    changed: str = ""
    error: str = ""
    kind: str = ""

    @property
    def failed(self) -> str:
        """Why these bytes cannot be kept ("" when they can)."""
        return self.changed or self.error


@dataclass(frozen=True)
class Arrived:
    """One file an upload wrote into staging, with the hash the server computed."""

    member: str
    size: int
    hash: str
