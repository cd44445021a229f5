"""A restore's staging on the server: what an interrupted restore left there, the room it needs, the upload."""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import TYPE_CHECKING

from ckptsync.agent import hash_file
from ckptsync.config import Target
from ckptsync.digests import LocalDigests
from ckptsync.disk import XXH3, io_error, new_hasher
from ckptsync.errors import ConnectError, DiskFull, IntegrityError, Interrupted
from ckptsync.checkpoint_names import RESTORED_MARKER
from ckptsync.policy import SPACE_MARGIN, fits, human
from ckptsync.progress import Reporter
from ckptsync.server import Arrived, Server, shares
from ckptsync.server.base import Upload, range_key
from ckptsync.server.parallel import Channels, Shared, run_all
from ckptsync.server.shares import Piece
from ckptsync.server.transfer import KEEP_PREFIX_MIN
from ckptsync.stores.manifest import FileRecord, Manifest

if TYPE_CHECKING:
    from ckptsync.restore import RestoreResult


class Rotted(IntegrityError):
    """Backup files whose bytes, hashed as they were sent, do not match their manifest."""

    def __init__(self, paths: list[str]) -> None:
        super().__init__(f"changed in the backup directory while being sent: {', '.join(paths)}; nothing was put "
                         "in place", hint="the backup copy is damaged: restore an older checkpoint with --checkpoint NAME")
        self.paths = paths


class Sender:
    """One restore's staging on the server; adds what it sends to `result`."""

    def __init__(self, server: Server, channels: Channels, target: Target, result: RestoreResult, files_root: Path,
                 digests: LocalDigests, rep: Reporter, compress: str, dry_run: bool) -> None:
        self.server, self.channels, self.target, self.result = server, channels, target, result
        self.files_root, self.digests, self.rep = files_root, digests, rep
        self.compress, self.dry_run = compress, dry_run
        self.staged = None        # what an interrupted restore left in staging (server.staged)
        self.usable: set[str] = set()   # the staged files that are checked and kept

    def usable_staged(self, root: str, m: Manifest, records: list[FileRecord], check: bool) -> set[str]:
        """Files an interrupted restore left in staging with the right size, mtime and (if check) hash."""
        stage = m.name
        found = self.server.staged(root, stage)
        self.staged, self.usable = found, set()
        staged, partial = found.files, found.partial
        if not staged and not partial:
            return set()
        want = {f.path: f for f in records}
        marker = posixpath.join(m.name, RESTORED_MARKER)  # staged last: sent again, never in the way
        inside = [p for p in list(staged) + list(partial)
                  if (p == m.name or p.startswith(m.name + "/")) and p != marker]
        if any(p not in want for p in inside):
            # It would be renamed into place with the checkpoint: start over.
            if not self.dry_run:
                self.server.discard(root, stage)
                self.staged = None
            return set()
        # A member with a leftover ".part" is sent again, which replaces the ".part" too.
        fits = [p for p, info in staged.items()
                if p in want and p not in partial and (info.size, info.mtime_ns) == (want[p].size, want[p].mtime_ns)]
        if not check or not fits:
            self.usable = set(fits)
            return set(fits)
        alg = self.server.best_hash
        where = {p: self.server.staging_member(stage, p) for p in fits}
        got = self.server.hash(root, list(where.values()), alg)
        self.usable = {p for p in fits if got.get(where[p]) is not None
                        and got.get(where[p]) == self.digests.get(want[p], alg, self.files_root / p)}
        return set(self.usable)

    def check_space(self, root: str, need: int, stage: str) -> None:
        """Refuse before sending when the server has no room for `need` bytes (exit 5)."""
        free = self.server.df(root).free
        held, reclaim = self.staging_bytes(root, stage)
        if fits(need, free + reclaim):  # staged bytes this run overwrites count as free
            return
        leftover = (f"; an interrupted restore's staging {self.server.staging_path(root, stage)} holds "
                    f"{human(held)} ({human(reclaim)} of it is sent again, so it was counted as free)"
                    if held else "")
        raise DiskFull(
            f"not enough space on {self.result.server} in {root}: this restore needs {human(need)} plus a "
            f"{human(SPACE_MARGIN)} margin, {human(free)} is free (nothing was sent){leftover}",
            hint=("free some space on the server"
                  + (f", or drop the leftover staging: {self.target.printed.command('restore', '--checkpoint', stage, '--discard-staged')}"
                     if held else "")
                  + ", or send only the weights with --adapter-only"))

    def staging_bytes(self, root: str, stage: str) -> tuple[int, int]:
        """Bytes the staging of `stage` holds, and how many of them this run overwrites."""
        found = self.staged
        if found is None:
            return 0, 0
        usable = self.usable
        parts = {p: self.server.staging_member(stage, p + ".part") for p in found.partial}
        there = self.server.stat(root, list(parts.values())) if parts else {}
        part_sizes = {p: st.size for p, st in there.items() if st is not None}
        held = sum(st.size for st in found.files.values()) + sum(part_sizes.values())
        reclaim = sum(st.size for p, st in found.files.items() if p not in usable) + sum(part_sizes.values())
        return held, reclaim

    def send(self, root: str, name: str, files: list[FileRecord]) -> None:
        """Send `files` into the staging of `name`, each checked as it arrived; nothing is put in place."""
        if not files:
            return
        stage = name  # the staging directory is named after the checkpoint: a rerun finds it
        staging = self.server.staging_path(root, stage)
        rotted = []
        kept = self._kept_parts(root, stage, files)
        self.rep.start(f"send {name}", sum(f.size for f in files))
        try:
            sent = self._uploads(root, stage, files, kept)
        except KeyboardInterrupt:
            raise Interrupted(
                f"interrupted while sending {name}: nothing was put in place under {posixpath.join(root, name)}; "
                f"the files that arrived completely are kept in {staging} on the server, and running the same "
                "restore again sends only the rest") from None
        except ConnectError as exc:
            raise type(exc)(f"{exc.message} ({name}: nothing was put in place; the files that arrived are kept in "
                            f"{staging} on the server; run the same restore again to send only the rest)",
                            hint=exc.hint) from exc
        except DiskFull as exc:
            raise DiskFull(f"{exc.message} while sending {name}: nothing was put in place; what arrived is kept "
                           f"in {staging} on the server",
                           hint="free some space there and run the same restore again (it sends only the rest), "
                                "or drop what arrived: "
                                + self.target.printed.command("restore", "--checkpoint", name, "--discard-staged")) from exc
        finally:
            self.rep.finish()
        arrived: dict[str, Arrived] = {}
        hashes: dict[str, str] = {}
        wire_bytes = 0
        for got, hashed, rot, on_wire in sent:
            arrived.update(got)
            hashes.update(hashed)
            rotted += rot
            wire_bytes += on_wire
        if rotted:
            raise Rotted(rotted)
        bad = [f.path for f in files
               if f.path not in arrived or arrived[f.path].size != f.size or arrived[f.path].hash != hashes.get(f.path)]
        if bad:
            raise IntegrityError(f"arrived damaged on the server: {', '.join(bad)}; nothing was put in place",
                                 hint="run the same restore again")
        r = self.result
        r.sent_files += len(files)
        r.sent_bytes += sum(f.size for f in files) - sum(kept.values())
        r.resumed_bytes += sum(kept.values())
        r.wire_bytes += wire_bytes

    def open_ahead(self, files: list[FileRecord]) -> None:
        """Start opening the channels sending `files` will take, while the run still checks the server."""
        if files:
            self.channels.open_ahead(max(len(self._plan(files)), 1))

    def _plan(self, files: list[FileRecord], channels: int | None = None) -> list:
        """The shares of `files` over `channels`, by default those their bytes are worth."""
        if channels is None:
            channels = self.channels.wanted_for(sum(f.size for f in files), upload=True)
        return [s for s in shares.plan([(f.path, f.path, f.size) for f in files], channels) if s]

    def _uploads(self, root: str, stage: str, files: list[FileRecord], kept: dict[str, int]) -> list[tuple]:
        """Send the files into staging over as many channels as they can keep busy, about the same
        bytes each, a large file as byte ranges over several (finished by Server.assemble); one
        (arrived, hashes sent, rotted, wire bytes) per channel. A split file's kept prefix is
        written over, so `kept` loses it."""
        by_path = {f.path: f for f in files}
        planned = self._plan(files)
        servers = self.channels.take(max(len(planned), 1))
        if len(planned) <= 1 or len(servers) < 2:
            whole = [Piece(f.path, f.path) for f in files]
            return [self._upload(self.server, root, stage, whole, by_path, kept, self.rep)]
        if len(servers) < len(planned):
            planned = self._plan(files, len(servers))
        self.channels.most = max(self.channels.most, len(planned))
        ranges = [p for share in planned for p in share if p.start is not None]
        split = {p.member for p in ranges}
        for member in split:
            kept.pop(member, None)
        rep = Shared(self.rep)
        sent = run_all(servers[:len(planned)],
                       lambda i: self._upload(servers[i], root, stage, planned[i], by_path, kept, rep))
        if split:
            sent.append(self._assemble(root, stage, [f for f in files if f.path in split], ranges, sent))
        return sent

    def _assemble(self, root: str, stage: str, files: list[FileRecord], pieces: list[Piece],
                  sent: list[tuple]) -> tuple:
        """Check every range (`pieces`) of the split files, then have the server finish them;
        returns the whole files as one more channel's (arrived, hashes, rotted, wire bytes)."""
        arrived: dict[str, Arrived] = {}
        hashes: dict[str, str] = {}
        for got, hashed, _rot, _wire in sent:
            arrived.update(got)
            hashes.update(hashed)
        ranges = [range_key(p.member, p.start) for p in pieces]
        bad = [k for k in ranges if k not in arrived or k not in hashes or arrived[k].hash != hashes[k]]
        if bad:
            raise IntegrityError(f"arrived damaged on the server: {', '.join(sorted(bad))}; nothing was put in place",
                                 hint="run the same restore again")
        alg = self.server.best_hash
        whole = self.server.assemble(root, stage, [(f.path, f.size, f.mtime_ns, f.mode) for f in files])
        expect, rotted = {}, []
        for f in files:
            local = self.files_root / f.path
            try:
                expect[f.path] = self.digests.get(f, alg, local) or ""   # "": the copy here changed
                if whole.get(f.path) is not None and whole[f.path].hash != expect[f.path] \
                        and hash_file(local) != f.xxh3_128:
                    rotted.append(f.path)   # the ranges were read from a copy that changed here
            except OSError as exc:
                raise io_error(exc, f"reading {local}") from None
        return whole, expect, rotted, 0

    def _upload(self, server: Server, root: str, stage: str, pieces: list[Piece], by_path: dict[str, FileRecord],
                kept: dict[str, int], rep: Reporter) -> tuple[dict[str, Arrived], dict[str, str], list[str], int]:
        up = server.receive(root, stage, compress=self.compress)
        rotted = []
        # The send hashes what it reads in the server's algorithm: where that is the manifest's, it
        # is the check against rot too, and the bytes are hashed once.
        once = server.best_hash == XXH3
        for piece in pieces:
            f = by_path[piece.member]
            if piece.start is not None:
                self._upload_range(up, f, piece, rep)
                continue
            seen = None if once else new_hasher()

            def also(block: bytes, seen=seen) -> None:
                if seen is not None:
                    seen.update(block)
                rep.advance(len(block))

            path = self.files_root / f.path
            try:
                with open(path, "rb") as fh:
                    sent = up.add(f.path, fh, f.size, f.mtime_ns, f.mode, also=also, offset=kept.get(f.path, 0))
            except OSError as exc:
                raise io_error(exc, f"reading {path}") from None
            if (sent if seen is None else seen.hexdigest()) != f.xxh3_128:
                rotted.append(f.path)
            else:
                self.digests.learn(f.xxh3_128, f.size, server.best_hash, sent)
        arrived = up.finish()
        return arrived, dict(up.sent), rotted, up.wire_bytes

    def _upload_range(self, up: Upload, f: FileRecord, piece: Piece, rep: Reporter) -> None:
        path = self.files_root / f.path
        try:
            with open(path, "rb") as fh:
                up.add_range(f.path, fh, piece.start, piece.length, f.mtime_ns, f.mode,
                             also=lambda block: rep.advance(len(block)))
        except OSError as exc:
            raise io_error(exc, f"reading {path}") from None

    def _kept_parts(self, root: str, stage: str, files: list[FileRecord]) -> dict[str, int]:
        """Large files an interrupted restore left partly written in staging, whose bytes there hash
        like the same first bytes of the backup's copy: path -> how many need not be sent again."""
        found = self.staged
        want = {f.path: f for f in files if found is not None and f.path in found.partial}
        if not want:
            return {}
        parts = {p: self.server.staging_member(stage, p + ".part") for p in want}
        st = self.server.stat(root, list(parts.values()))
        sizes = {p: st[parts[p]].size for p in want if st.get(parts[p]) is not None
                 and KEEP_PREFIX_MIN <= st[parts[p]].size <= want[p].size}
        if not sizes:
            return {}
        alg = self.server.best_hash
        got = self.server.hash(root, [parts[p] for p in sizes], alg)
        kept = {}
        for p, n in sizes.items():
            try:
                mine = hash_file(self.files_root / p, alg, limit=n)
            except OSError:
                continue  # the send reports it
            if got.get(parts[p]) == mine:
                kept[p] = n
        return kept
