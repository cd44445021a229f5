"""restore from a store whose server reads the bytes itself (a bucket: the store's data_path
fetches them); the same RestoreResult and RestoreAllResult as restore.py and restore_all.py."""

from __future__ import annotations

import contextlib
import posixpath
import time
from typing import Any, Callable

from ckptsync.config import Target
from ckptsync.errors import DiskFull, UsageError
from ckptsync.policy import SPACE_MARGIN, fits, human
from ckptsync.progress import QUIET, Reporter
from ckptsync.restore import FileItem, RestoreOptions, RestoreResult
from ckptsync.restore_all import RestoreAll, RestoreAllResult
from ckptsync.restore_choice import choose, newest_first, pick_generation, resume_hint
from ckptsync.server import Server, open_server
from ckptsync.stores import Store


def run_direct_restore(t: Target, store: Store, path: Any, opts: RestoreOptions, rep: Reporter = QUIET,
                       server: Server | None = None, connect: Callable[[], Server] | None = None) -> RestoreResult:
    """One entry (or, with `opts.generation`, an earlier version of it) onto the server: `path`
    (the store's data_path) has the server fetch it into staging, checked there; then the entry
    is renamed into place whole."""
    started = time.monotonic()
    m, notes = choose(newest_first(store.manifests()), opts.checkpoint, adapter_only=False)
    entry = pick_generation(store, m.name, opts.generation) if opts.generation is not None else path.entry(m.name)
    m = entry.manifest
    with (contextlib.nullcontext(server) if server is not None else open_server(t, connect)) as server, \
            contextlib.ExitStack() as held:
        root = server.mkdir(t.remote_dir)
        held.enter_context(server.holding(root, "ckptsync restore"))  # one run at a time writes into it
        if entry.alg not in server.hashes:
            raise UsageError(f"{server.describe()} cannot compute {entry.alg}, the hash {m.name} was recorded with")
        free = server.df(root).free
        if not fits(m.size, free):
            raise DiskFull(f"not enough space on {server.describe()} in {root}: {m.name} needs {human(m.size)} "
                           f"plus a {human(SPACE_MARGIN)} margin, {human(free)} is free (nothing was written)")
        there = server.stat(root, [m.name]).get(m.name)
        if there is not None and not opts.force:
            raise UsageError(f"{posixpath.join(root, m.name)} already exists on {server.describe()}",
                             hint="add --force to replace it, or restore into another --remote-dir")
        out = RestoreResult(target=t.label, server=server.describe(), source=store.location, remote_dir=root,
                            dry_run=False, direct=True, checkpoint=m.name, generation=entry.id, step=m.step, layout=m.layout, content=m.content,
                            path=posixpath.join(root, m.name), exact_resume=m.resumable,
                            replaced=there is not None, warnings=list(notes))
        rep.start(m.name, m.size)
        try:
            for f in path.fetch(server, root, entry):
                out.files.append(FileItem(f.path, f.size, "send"))
                out.sent_files += 1
                out.sent_bytes += f.size
                rep.advance(f.size)
        finally:
            rep.finish()
        done = server.commit(root, m.name, [(m.name, m.name)], force=opts.force)
        if m.name in done.kept:
            raise UsageError(f"{m.name} appeared in {root} during the restore and was left as it is",
                             hint="add --force to replace it")
        server.discard(root, m.name)
        out.resume_hint = resume_hint(m, root, out.path, exact=m.resumable)
    out.seconds = time.monotonic() - started
    return out


def run_direct_restore_all(t: Target, store: Store, path: Any, opts: RestoreOptions,
                           rep: Reporter = QUIET) -> RestoreAllResult:
    return _RestoreAll(t, store, path, RestoreOptions(force=opts.force, extra_files=False), rep).run()


class _RestoreAll(RestoreAll):
    """restore --all: every entry newest first, each a direct restore."""

    def __init__(self, t: Target, store: Store, path: Any, opts: RestoreOptions, rep: Reporter) -> None:
        super().__init__(t, opts, rep)
        self.store, self.path = store, path
        self.result.source = store.location
        self.result.direct = True

    def manifests(self):
        return self.store.manifests()

    def damaged(self) -> dict:
        return {}   # a bucket's unreadable manifests are the bucket store's to report

    def restore_one(self, server, name: str, extras: bool, names: frozenset[str]):
        one = RestoreOptions(checkpoint=name, force=self.opts.force, extra_files=False)
        return run_direct_restore(self.target, self.store, self.path, one, self.rep, server)
