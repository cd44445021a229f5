"""A backup directory in a bucket: `<prefix>/<label>/`, laid out like the local one.

    <checkpoint>/<file>                      the file's plain bytes
    .ckptsync/manifests/<name>.json          written last: an entry exists only when its manifest does
    .ckptsync/generations/<name>/<id>.json   an earlier version of a reused name, its objects under
    .ckptsync/generations/<name>/<id>/...    (copied there inside the bucket before the name is reused)
    .ckptsync/lock                           owner and lease, taken with a conditional write
    .ckptsync/status.json                    the last backup run (and status-scheduled/-manual.json)
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from ckptsync import osdeps
from ckptsync.disk import new_hasher
from ckptsync.errors import CkptsyncError, IOFailure, Locked, UsageError
from ckptsync.policy import RunStatus, newest_generations, status_file
from ckptsync.s3 import AWS_CARRIED, AWS_SECRET, StoreUrl, parse_url, require_boto3
from ckptsync.s3.bucket import Bucket, Conflict, Settings
from ckptsync.stores import CORRUPT, MISSING
from ckptsync.stores.manifest import Manifest

META = ".ckptsync"
MANIFESTS = f"{META}/manifests/"
GENERATIONS = f"{META}/generations/"
LOCK = f"{META}/lock"


@dataclass
class Entry:
    """A manifest in the bucket, with the ETag of every object it names."""

    manifest: Manifest
    etags: dict[str, str] = field(default_factory=dict)   # path -> ETag
    alg: str = "xxh3_128"
    base: str = ""   # where its objects are, below the store: "" for an entry, a generation's folder
    gid: str = ""    # a generation's id (its old backup time), "" for an entry

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def id(self) -> str:
        return self.gid

    @property
    def label(self) -> str:
        return f"{self.name}@{self.gid}" if self.gid else self.name

    def to_json(self) -> bytes:
        data = self.manifest.to_dict()
        data["etags"] = self.etags
        data["hash_alg"] = self.alg
        return json.dumps(data, indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, raw: bytes) -> "Entry":
        data = json.loads(raw.decode("utf-8"))
        etags = {str(k): str(v) for k, v in (data.pop("etags", None) or {}).items()}
        alg = str(data.pop("hash_alg", "xxh3_128"))
        return cls(Manifest.from_dict(data), etags, alg)


def open_bucket_store(url: str, s3: dict, where: str, clock: Callable[[], float] = time.time) -> "BucketStore":
    """The store at `url`, with the s3: settings of the config at `where`."""
    root = parse_url(url)
    return BucketStore(Bucket(root, Settings.from_config(s3, where)), root, clock)


class BucketStore:
    """A stores.Store; with check_objects (sizes and ETags from a listing, without reading)."""

    kind = "a bucket store"
    ENVIRONMENT = AWS_CARRIED   # what stores.describe tells a cron entry to carry, and not
    SECRETS = AWS_SECRET

    @staticmethod
    def log_dir(url: str) -> Path:
        """A bucket holds no log of scheduled runs: it stays on this machine, under the URL."""
        return osdeps.state_home() / "ckptsync" / url[len("s3://"):]

    @staticmethod
    def ready() -> None:
        require_boto3()

    def __init__(self, bucket: Bucket, root: StoreUrl, clock: Callable[[], float] = time.time) -> None:
        self.bucket = bucket
        self.root = root
        self.clock = clock

    @property
    def location(self) -> str:
        return str(self.root)

    def data_path(self, via_laptop: bool = False):
        """An ability (stores/__init__.py): how a backup's and a restore's bytes travel, the server
        moving them to and from the bucket itself (s3/direct.py)."""
        from ckptsync.s3.direct import BucketPath

        return BucketPath(self, via_laptop)

    def exists(self) -> bool:
        return True   # an empty prefix is an empty store; a missing bucket fails the first request

    def unmanaged(self) -> list[str]:
        return []     # objects no manifest names are not entries: sweep() removes them

    def freed_bytes(self, names: list[str], generations: list[Entry] = ()) -> int:
        entries = self.entries()
        return sum(entries[n].manifest.size for n in names if n in entries) + sum(g.manifest.size for g in generations)

    def unfinished_uploads(self) -> int:
        """Multipart uploads in progress or abandoned: the next backup resumes them, prune aborts them."""
        return len(self.bucket.uploads(self.key("")))

    def sweep(self, keep: list[str], dry_run: bool) -> tuple[int, int, int]:
        """Delete every object that no manifest of `keep` names (the bookkeeping aside), and abort
        the unfinished multipart uploads: (objects, bytes, uploads), removed or, dry run, to remove.
        Call under the lock, where no upload of this store runs."""
        entries = self.entries()
        wanted = {self.key(f.path) for n in keep if n in entries for f in entries[n].manifest.files}
        meta = self.key(META + "/")
        stray = {k: s for k, (s, _e) in self.objects().items() if k not in wanted and not k.startswith(meta)}
        uploads = self.bucket.uploads(self.key(""))
        if not dry_run:
            self.bucket.delete(sorted(stray))
            for key, upload, _started in uploads:
                self.bucket.abort_multipart(key, upload)
        return len(stray), sum(stray.values()), len(uploads)

    def key(self, path: str) -> str:
        return self.root.key(path)

    def manifest_key(self, name: str) -> str:
        return self.key(MANIFESTS + name + ".json")

    def entries(self) -> dict[str, Entry]:
        """Every entry that has a manifest; an unreadable manifest is an error, not a silent gap."""
        out = {}
        for key, _size, _etag in self.bucket.list(self.key(MANIFESTS)):
            if not key.endswith(".json"):
                continue
            entry = self._read_entry(key)
            if entry is not None:
                out[entry.name] = entry
        return out

    def manifests(self) -> dict[str, Manifest]:
        return {name: e.manifest for name, e in self.entries().items()}

    def damaged(self) -> dict[str, tuple[str, str]]:
        return {}   # an unreadable manifest in a bucket stops the run instead (entries())

    def read_file(self, path: str, limit: int) -> bytes | None:
        """An entry's object (`path` as in its manifest); None when it is larger than `limit`."""
        got = self.bucket.get(self.key(path))
        if got is None:
            raise FileNotFoundError(f"{self.root}/{path}: not in the bucket")
        return None if len(got[0]) > limit else got[0]

    def object_key(self, entry: Entry, path: str) -> str:
        return self.key(entry.base + path)

    def _read_entry(self, key: str) -> Entry | None:
        got = self.bucket.get(key)
        if got is None:
            return None  # deleted since the listing (a prune)
        try:
            return Entry.from_json(got[0])
        except (ValueError, TypeError, KeyError) as exc:
            raise IOFailure(f"s3://{self.root.bucket}/{key}: not a ckptsync manifest ({exc})") from None

    # -------------------------------------------------- generations

    def generations(self, name: str | None = None) -> dict[str, list[Entry]]:
        """Name -> its earlier versions, newest first; as on disk, a generation is its manifest."""
        out: dict[str, list[Entry]] = {}
        for key, owner, gid in self._generation_manifests(name):
            g = self._read_entry(key)
            if g is None:
                continue
            g.gid, g.base = gid, f"{GENERATIONS}{owner}/{gid}/"
            out.setdefault(owner, []).append(g)
        return {name: newest_generations(gens) for name, gens in out.items()}

    def _generation_manifests(self, name: str | None) -> list[tuple[str, str, str]]:
        """(key, name, id) of the generation manifests (of `name`, or of every name), from one listing."""
        top = self.key(GENERATIONS)
        out = []
        for key, _size, _etag in self.bucket.list(top + (f"{name}/" if name else "")):
            owner, _, file = key[len(top):].partition("/")
            if "/" not in file and file.endswith(".json"):   # not an object of a generation
                out.append((key, owner, file[:-len(".json")]))
        return out

    def keep_generation(self, old: Entry) -> Entry:
        """Copy `old`'s objects to a generation of its name and write that generation's manifest.
        Nothing of `old` is touched: the caller may reuse the name once this returns."""
        base_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime(old.manifest.backed_up_at)) \
            if old.manifest.backed_up_at else "unknown"
        taken = {gid for _key, _owner, gid in self._generation_manifests(old.name)}
        gid, n = base_id, 1
        while gid in taken:
            n += 1
            gid = f"{base_id}-{n}"
        g = Entry(old.manifest, {}, old.alg, base=f"{GENERATIONS}{old.name}/{gid}/", gid=gid)
        for f in old.manifest.files:
            g.etags[f.path] = self.bucket.copy(self.object_key(old, f.path), self.object_key(g, f.path), f.size)
        self.bucket.put(self.key(f"{GENERATIONS}{old.name}/{gid}.json"), g.to_json())
        return g

    def drop_generation(self, g: Entry) -> None:
        """Its manifest first, so a half-removed generation is never listed; then its objects."""
        self.bucket.delete([self.key(f"{GENERATIONS}{g.name}/{g.gid}.json")])
        self.bucket.delete(sorted(k for k, _s, _e in self.bucket.list(self.key(g.base))))

    def trim_generations(self, name: str, keep: int) -> list[Entry]:
        dropped = self.generations(name).get(name, [])[max(keep, 0):]
        for g in dropped:
            self.drop_generation(g)
        return dropped

    def new_entry(self, manifest: Manifest, etags: dict[str, str], alg: str) -> Entry:
        return Entry(manifest, etags, alg)

    def write_entry(self, entry: Entry, replace: bool = False) -> None:
        """The last write of a backup. Without `replace`, only when no manifest of that name exists."""
        self.bucket.put(self.manifest_key(entry.name), entry.to_json(), if_none_match=not replace)

    def drop_entry(self, name: str) -> None:
        self.bucket.delete([self.manifest_key(name)])

    def remove_entry(self, name: str) -> None:
        """Its manifest first (the entry is gone whole from then on), then its objects."""
        entry = self.entries().get(name)
        self.drop_entry(name)
        if entry is not None:
            self.bucket.delete(sorted({self.object_key(entry, f.path) for f in entry.manifest.files}))

    def objects(self, generations: bool = False) -> dict[str, tuple[int, str]]:
        """key -> (size, etag) of every object of the entries (the bookkeeping under .ckptsync aside),
        and of the generations' too when asked."""
        meta, kept = self.key(META + "/"), self.key(GENERATIONS)
        return {k: (s, e) for k, s, e in self.bucket.list(self.key(""))
                if not k.startswith(meta) or (generations and k.startswith(kept) and k[len(kept):].count("/") >= 2)}

    def check_objects(self, names: list[str], read_data: bool,
                      on_block: Callable[[int], None] = lambda n: None) -> Iterator[tuple[str, Manifest, list]]:
        """Each entry of `names` (every entry when empty), then its earlier versions (as NAME@ID):
        (label, manifest, [(path, kind, detail)]). Sizes and ETags from one listing; with
        `read_data`, the bytes too, streamed through this machine and hashed."""
        entries, kept = self.entries(), self.generations()
        objects = self.objects(generations=True)
        for name in names or sorted(entries):
            for e in [entries[name], *kept.get(name, [])]:
                yield e.label, e.manifest, list(self._object_problems(e, objects, read_data, on_block))

    def _object_problems(self, e: Entry, objects: dict, read_data: bool, on_block) -> Iterator[tuple[str, str, str]]:
        for f in e.manifest.files:
            key = self.object_key(e, f.path)
            got = objects.get(key)
            if got is None:
                yield f.path, MISSING, "not in the bucket"
            elif got[0] != f.size:
                yield f.path, CORRUPT, f"{got[0]} bytes in the bucket, the manifest says {f.size}"
            elif e.etags.get(f.path) and got[1] != e.etags[f.path]:
                yield f.path, CORRUPT, f"the object was replaced (ETag {got[1]}, recorded {e.etags[f.path]})"
            elif read_data:
                h = new_hasher(e.alg)
                for block in self.bucket.stream(key):
                    h.update(block)
                    on_block(len(block))
                if h.hexdigest() != f.xxh3_128:
                    yield f.path, CORRUPT, f"its bytes hash to {h.hexdigest()}, the manifest says {f.xxh3_128}"

    def status_key(self, kind: str = "") -> str:
        return self.key(f"{META}/{status_file(kind)}")

    def record_status(self, status: RunStatus) -> None:
        """As the local store does: the last run, and the last of its kind (scheduled or manual)."""
        raw = status.to_json().encode("utf-8")
        self.bucket.put(self.status_key(), raw)
        self.bucket.put(self.status_key(status.kind), raw)

    def status(self, kind: str = "") -> RunStatus | None:
        got = self.bucket.get(self.status_key(kind))
        return RunStatus.from_json(got[0] if got is not None else None)

    def lock(self, command: str, wait: bool = False, on_wait=None, hint: str = "", stall_limit: float | None = None,
             on_takeover: Callable[[str], None] | None = None) -> "LeaseLock":
        """A lease (LeaseLock); a run that dies leaves one that is taken over once it has passed
        (`on_takeover` says so). Waiting for another run is not offered."""
        if wait:
            raise UsageError(f"--wait does not work on {self.kind}")
        return LeaseLock(self, command, on_takeover)


class LeaseLock:
    """One run per store prefix: a lock object holding its owner and when its lease ends.

    Taken with If-None-Match, refreshed (If-Match) by a thread at a third of the lease, so a
    run that dies leaves a lock that others take over once the lease has passed.
    """

    def __init__(self, store: BucketStore, command: str, on_takeover: Callable[[str], None] | None) -> None:
        self.store = store
        self.key = store.key(LOCK)
        self.lease = store.bucket.settings.lease_seconds
        self.owner = f"{command} pid {os.getpid()} on {socket.gethostname()}"
        self.token = uuid.uuid4().hex
        self.on_takeover = on_takeover
        self.etag = ""
        self.lost = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps({"owner": self.owner, "token": self.token,
                           "expires": self.store.clock() + self.lease}).encode("utf-8")

    def acquire(self) -> None:
        bucket = self.store.bucket
        try:
            self.etag = bucket.put(self.key, self._body(), if_none_match=True)
            return
        except Conflict:
            pass
        got = bucket.get(self.key)
        if got is None:  # released meanwhile
            self.etag = bucket.put(self.key, self._body(), if_none_match=True)
            return
        raw, etag = got
        try:
            held = json.loads(raw.decode("utf-8"))
            owner, expires = str(held.get("owner", "?")), float(held.get("expires", 0))
        except (ValueError, AttributeError):
            owner, expires = "an unreadable lock", 0.0
        now = self.store.clock()
        if expires > now:
            raise Locked(f"s3://{self.store.root.bucket}/{self.key} is held by {owner} "
                         f"(lease ends in {expires - now:.0f}s)",
                         hint="wait for that run to end; a lock whose lease has passed is taken over")
        try:
            self.etag = bucket.put(self.key, self._body(), if_match=etag)
        except Conflict:
            raise Locked(f"s3://{self.store.root.bucket}/{self.key} was just taken by another run") from None
        if self.on_takeover:
            self.on_takeover(f"took over the lock of {owner}: its lease ended {now - expires:.0f}s ago")

    def refresh(self) -> None:
        try:
            self.etag = self.store.bucket.put(self.key, self._body(), if_match=self.etag)
        except Conflict:
            self.lost = "the lock was taken over by another run (this run's lease had passed)"

    def _keep(self) -> None:
        while not self._stop.wait(self.lease / 3):
            try:
                self.refresh()
            except CkptsyncError:  # a refresh that failed is tried again at the next beat
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        got = self.store.bucket.get(self.key)
        if got is not None:
            try:
                mine = json.loads(got[0].decode("utf-8")).get("token") == self.token
            except (ValueError, AttributeError):
                mine = False
            if mine:
                self.store.bucket.delete([self.key])

    def __enter__(self) -> "LeaseLock":
        self.acquire()
        self._thread = threading.Thread(target=self._keep, daemon=True, name="ckptsync-lease")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
