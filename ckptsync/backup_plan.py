"""What a backup plans before it takes the lock: its result, each checkpoint's plan, the extra files, the room."""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

from ckptsync.commit import usable_staged
from ckptsync.disk import free_bytes, io_error
from ckptsync.errors import OK, PARTIAL, DiskFull
from ckptsync.freshness import Judgement
from ckptsync.layout import Checkpoint
from ckptsync.policy import SPACE_MARGIN, fits, human
from ckptsync.result import Result
from ckptsync.runs import RunState
from ckptsync.scan import ServerView
from ckptsync.selection import BackupOptions, PlanItem, unsaved
from ckptsync.server import FileStat, Server
from ckptsync.stores.directory import DirectoryStore as Store
from ckptsync.stores.manifest import EXTRA


@dataclass
class BackupResult(Result):
    target: str
    server: str
    dest: str
    dry_run: bool
    plan: list[PlanItem] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)
    restamped: list[str] = field(default_factory=list)   # same bytes on the server, new stamps recorded
    generations: list[str] = field(default_factory=list)  # "NAME@ID": earlier versions kept
    dropped_generations: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)      # NAME.replaced-* entries turned into generations
    runs: list["BackupResult"] = field(default_factory=list)   # followed runs, each into its own directory
    unfollowed: list[RunState] = field(default_factory=list)  # newer runs whose newest checkpoint is not saved
    follow_hint: str = ""     # the command that backs them up
    failed: dict[str, str] = field(default_factory=dict)
    # Committed, then found deleted on the server (or staged by an earlier run for a checkpoint the
    # server has deleted since): the backup is now the only copy.
    deleted_on_server: list[str] = field(default_factory=list)
    # Complete on the server and not in the backup after this run (not selected, or failed).
    not_backed_up: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    raw_bytes: int = 0        # file bytes that crossed the link
    resumed_bytes: int = 0    # kept bytes of files an interrupted run had partly fetched: not sent again
    wire_bytes: int = 0       # after compression
    disk_bytes: int = 0       # newly stored bytes (hard links and reflinks excluded, local copies included)
    linked_files: int = 0     # hard links to stored files with the same content, mode and mtime
    linked_bytes: int = 0
    reflinked_files: int = 0  # clones sharing a stored file's blocks, with their own mode and mtime
    reflinked_bytes: int = 0
    copied_files: int = 0     # copied from a stored file instead of fetched: no disk saved, no transfer
    copied_bytes: int = 0
    channels: int = 1         # the most connections one transfer of this run used at once (--parallel)
    sent_bytes: int = 0       # a bucket store: bytes sent into the bucket (by the server, or relayed from here)
    direct: bool = False      # a bucket store: the server sent them itself, none came through here
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return PARTIAL if self.failed or any(r.exit_code for r in self.runs) else OK

    @property
    def to_fetch(self) -> list[PlanItem]:
        return [p for p in self.plan if p.action == "fetch"]

    @property
    def current(self) -> list[str]:
        """Names the backup already held, including those whose stamps were brought up to date."""
        return [p.name for p in self.plan if p.action in ("up-to-date", "restamp")]

    @property
    def fetch_bytes(self) -> int:
        """What the plan fetches (or, in a dry run, would)."""
        return sum(p.fetch_bytes for p in self.to_fetch)

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["runs"] = [r.to_dict() for r in self.runs]
        return out


def name_unsaved(r: BackupResult, checkpoints: list[Checkpoint], stored: set[str], first_run: bool,
                 opts: BackupOptions, hint: str) -> str:
    """Fill r.not_backed_up: every complete checkpoint left without a backup after the run `r`
    (a dry run counts what it would fetch as taken). Returns the warning that names them, or ""."""
    taken = set(r.fetched) | set(r.current)
    if r.dry_run:
        taken |= {p.name for p in r.plan if p.action == "fetch"}
    r.not_backed_up, warning = unsaved(checkpoints, taken, r.failed, stored, first_run, opts, hint)
    return warning


def plan_checkpoint(store: Store, view: ServerView, c: Checkpoint, judged: Judgement) -> PlanItem:
    server = view.files_of(c)
    if judged.current:
        return PlanItem(c.name, "restamp" if judged.restamp else "up-to-date", c.size,
                        files=len(judged.restamp), step=c.step)
    staged = usable_staged(store, c.name, server, check_hash=False)
    need = [p for p in server if p not in staged]
    return PlanItem(c.name, "fetch", c.size, sum(server[p].size for p in need), len(need), step=c.step)


def check_space(store: Store, todo: list[PlanItem], discard_command: str) -> None:
    """Refuse a plan the backup directory's disk cannot hold (exit 7), naming staging that holds space."""
    need = sum(p.fetch_bytes for p in todo)
    try:
        free = free_bytes(store.root)
    except OSError as exc:
        raise io_error(exc, f"measuring free space in {store.root}") from None
    if not fits(need, free):
        leftover = store.staged_bytes()
        extra = (f"; {human(leftover)} of it is held by an interrupted backup's staging in "
                 f"{store.meta / 'staging'} (kept to resume)"
                 if leftover else "")
        raise DiskFull(
            f"not enough space in {store.root}: this backup needs {human(need)} plus a "
            f"{human(SPACE_MARGIN)} margin, {human(free)} is free (nothing was written){extra}",
            hint="free some space, choose another --local-dir, or back up fewer checkpoints"
                 + (f"; drop the staging with: {discard_command}" if leftover else ""),
        )


def extra_members(extra_files: list[str]) -> dict[str, str]:
    """Configured path -> member name under extra-files/ (basenames made unique)."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for src in extra_files:
        base = posixpath.basename(src.rstrip("/")) or "file"
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{n}-{base}"
        used.add(name)
        out[src] = f"{EXTRA}/{name}"
    return out


def stat_extras(server: Server, root: str, extra_files: list[str], warnings: list[str],
                failed: dict[str, str]) -> dict[str, tuple[str, FileStat]]:
    """member -> (configured path, its FileStat as the member) of the extra files the server has;
    a missing one is a warning, not an error (it may not exist yet). One the server could not
    look at is not taken as missing: the extra files fail (in `failed`) and none are returned."""
    members = extra_members(extra_files)
    if not members:
        return {}
    st = server.stat(root, list(members))
    if st.errors:
        what = "; ".join(f"{p}: {why}" for p, why in sorted(st.errors.items())[:3])
        failed[EXTRA] = f"extra files could not be read on the server ({what}); not recorded"
        return {}
    out = {}
    for src, member in members.items():
        info = st.get(src)
        if info is None or info.is_dir:
            warnings.append(f"extra file {src} not found on the server")
            continue
        out[member] = (src, FileStat(member, info.size, info.mtime_ns, info.mode, info.ctime_ns, info.inode))
    return out
