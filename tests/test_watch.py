"""`ckptsync watch` against a trainer the test drives one save at a time (tests/fake_trainer.py),
through the in-process server: the test runs one cycle at a time, with its own clock and sleep,
and puts faults (a rotation during the copy, a cut link, a full disk) at known points with hooks.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from ckptsync.errors import ConnectError, HostKeyError, Interrupted, LoginRefused
from ckptsync.server.inprocess import Hooks, InProcessServer
from ckptsync.stores.directory import DirectoryStore
from ckptsync.watch import Event, Watch, WatchOptions
from fake_trainer import FakeTrainer
from helpers import tree_digest
from test_json_docs import differences, documented_events, shape
from test_server_boundary import make_target

HOLD = ".ckptsync-hold"


class Clock:
    """This computer's clock as the test moves it; sleeping moves it too."""

    def __init__(self) -> None:
        self.now = 1_000_000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class World:
    def __init__(self, tmp_path: Path, shard_bytes: int = 0, **opts) -> None:
        self.run = tmp_path / "run"
        self.dest = tmp_path / "backup"
        self.trainer = FakeTrainer(self.run, shard_bytes=shard_bytes)
        self.hooks = Hooks()
        self.servers: list[InProcessServer] = []
        self.clock = Clock()
        self.events: list[Event] = []
        self.target = make_target(self.run, self.dest).with_policy(settle_seconds=0)
        self.watch = Watch(self.target, WatchOptions(**opts), on_event=self.events.append, clock=self.clock,
                           sleep=self.clock.sleep, connect=self.connect)   # the checklist's connection too

    def connect(self) -> InProcessServer:
        server = InProcessServer(self.hooks)
        self.servers.append(server)
        return server

    def said(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.event == kind]

    def committed(self) -> list[str]:
        return [e.checkpoint for e in self.said("committed")]

    def close(self) -> None:
        self.watch.close()
        self.trainer.stop()
        as_documented(self.events)


def as_documented(events: list) -> None:
    """Every event printed (Events, or the objects `watch --json` printed) has an example in
    docs/json.md with the same keys and types."""
    doc = documented_events()
    problems = []
    for e in events:
        real = e.to_dict() if isinstance(e, Event) else e
        if real["event"] not in doc:
            problems.append(f"{real['event']}: no example in docs/json.md")
        else:
            problems += [f"{real['event']}: {d}" for d in differences(shape(doc[real["event"]]), shape(real))]
    assert not problems, "\n".join(sorted(set(problems)))


@pytest.fixture
def world(tmp_path):
    w = World(tmp_path)
    yield w
    w.close()


def test_each_new_checkpoint_is_committed_after_its_save(world):
    w = world
    w.watch.start()
    assert w.said("started")[0].data["how"] == "inotify"
    for step in (10, 20, 30, 40, 50):
        w.trainer.save(step)
        before = tree_digest(w.trainer.checkpoint(step))
        w.watch.cycle()
        assert w.committed()[-1] == f"checkpoint-{step}"
        assert tree_digest(w.dest / f"checkpoint-{step}") == before
        status = json.loads((w.dest / ".ckptsync" / "status.json").read_text())
        assert status["command"] == "watch" and status["fetched"] == [f"checkpoint-{step}"] and status["ok"]
    assert w.committed() == ["checkpoint-10", "checkpoint-20", "checkpoint-30", "checkpoint-40", "checkpoint-50"]
    assert sorted(p.name for p in w.run.iterdir()) == ["checkpoint-30", "checkpoint-40", "checkpoint-50"]
    assert not (w.run / HOLD).exists()   # each hold released once its checkpoint was committed
    assert not w.said("lost") and not w.said("finished")   # the trainer is still running


def test_the_wait_returns_when_a_save_ends(world):
    w = world
    w.watch.start()
    w.watch.cycle()
    w.trainer.save(10)
    w.watch.wait()
    assert w.watch.due
    w.watch.cycle()
    assert w.committed() == ["checkpoint-10"]


def test_the_hold_keeps_a_checkpoint_rotated_away_before_it_was_copied(world):
    w = world
    w.watch.start()
    w.trainer.save(10)
    w.watch.cycle()
    w.trainer.save(20)
    saved = tree_digest(w.trainer.checkpoint(20))
    rotated = []

    def slow_link(args: dict) -> None:   # the trainer saves three more before the copy starts
        if not rotated and any(m.startswith("checkpoint-20/") for _src, m in args["pairs"]):
            w.trainer.save(30, 40, 50)
            rotated.append(True)

    w.hooks.on_before("send", slow_link)
    w.watch.cycle()
    assert rotated and not w.trainer.checkpoint(20).exists()   # rotated before a byte of it was read
    assert ["checkpoint-20"] in [e.data["checkpoints"] for e in w.said("held")]
    assert "checkpoint-20" in w.committed()
    assert tree_digest(w.dest / "checkpoint-20") == saved
    deleted = w.said("deleted_on_server")
    assert [e.checkpoint for e in deleted] == ["checkpoint-20"] and deleted[0].data["held"]
    assert "the hold kept it" in deleted[0].message
    w.watch.cycle()
    assert w.committed() == ["checkpoint-10", "checkpoint-20", "checkpoint-50", "checkpoint-40", "checkpoint-30"]
    assert not w.said("lost")
    assert not (w.run / HOLD).exists()   # each hold released once its checkpoint was committed


def test_without_the_hold_the_rotated_checkpoint_is_named_as_lost(tmp_path):
    w = World(tmp_path, hold=False)
    try:
        w.watch.start()
        w.trainer.save(10)
        w.watch.cycle()
        w.trainer.save(20)
        w.hooks.on_before("send", lambda args: w.trainer.save(30, 40, 50), times=1)
        w.watch.cycle()
        w.watch.cycle()
        lost = w.said("lost")
        assert [e.checkpoint for e in lost] == ["checkpoint-20"]
        assert "deleted on the server before it was backed up (not held (--no-hold))" in lost[0].message
        assert not (w.dest / "checkpoint-20").exists()
    finally:
        w.close()


def test_hold_max_reached_names_the_oldest_pending_as_lost(tmp_path):
    w = World(tmp_path, hold_max=2)
    try:
        w.watch.start()
        w.trainer.save(10)
        w.watch.cycle()
        w.trainer.save(20, 30, 40)      # three saves before the next cycle: one more than hold_max
        w.hooks.on_before("send", lambda args: w.trainer.save(50, 60), times=1)
        w.watch.cycle()
        assert ["checkpoint-30", "checkpoint-40"] in [e.data["checkpoints"] for e in w.said("held")]
        assert {"checkpoint-30", "checkpoint-40"} <= set(w.committed())
        w.watch.cycle()
        lost = w.said("lost")
        assert [e.checkpoint for e in lost] == ["checkpoint-20"]
        assert lost[0].data["reason"] == "hold_max (2) reached: the newer ones are held"
        assert set(w.committed()) == {"checkpoint-10", "checkpoint-30", "checkpoint-40", "checkpoint-50", "checkpoint-60"}
    finally:
        w.close()


def test_a_checkpoint_saved_and_rotated_away_during_a_long_copy_is_named_as_lost(tmp_path):
    w = World(tmp_path, hold_max=1)
    try:
        w.watch.start()
        w.trainer.save(10)
        w.watch.cycle()
        w.trainer.save(20)

        def long_copy(args: dict) -> None:   # while checkpoint-20 is copied, four more saves: 30 comes and goes
            if any(m.startswith("checkpoint-20/") for _src, m in args["pairs"]):
                w.trainer.save(30, 40, 50, 60)

        w.hooks.on_before("send", long_copy, times=1)
        w.watch.cycle()
        assert not (w.run / "checkpoint-30").exists() and "checkpoint-30" not in w.committed()
        w.watch.wait()                       # the files of checkpoint-30 came and went under remote_dir
        w.watch.cycle()
        lost = {e.checkpoint: e for e in w.said("lost")}
        assert "checkpoint-30" in lost, [e.message for e in w.events]
        assert lost["checkpoint-30"].data["reason"] == "saved and deleted on the server between two listings, while a copy ran"
        w.trainer.stop()
        w.watch.cycle()
        [finished] = w.said("finished")
        assert "checkpoint-30" in finished.data["lost"] and "every checkpoint on the server is backed up" in finished.message
        assert "lost (deleted on the server before they were backed up): " in finished.message
        assert w.watch.result.exit_code == 3    # SAFE now, but not every checkpoint made it
    finally:
        w.close()


def test_a_checkpoint_saved_during_a_long_cycle_is_held_before_the_next_transfer(world):
    w = world
    w.watch.start()
    w.trainer.save(10)
    w.watch.cycle()
    w.trainer.save(20, 30)
    saved = {}

    def during(args: dict) -> None:
        members = {m.split("/")[0] for _src, m in args["pairs"]}
        if members == {"checkpoint-30"}:        # the first transfer of the cycle (the newest first)
            w.trainer.save(40)
            saved[40] = tree_digest(w.trainer.checkpoint(40))
        elif members == {"checkpoint-20"}:      # the second: by now checkpoint-40 is held
            w.trainer.save(50, 60, 70)          # and the rotation deletes it

    w.hooks.on_before("send", during)
    w.watch.cycle()
    assert not w.trainer.checkpoint(40).exists()
    assert any("checkpoint-40" in e.data["checkpoints"] for e in w.said("held"))
    w.watch.cycle()
    assert "checkpoint-40" in w.committed() and not w.said("lost")
    assert tree_digest(w.dest / "checkpoint-40") == saved[40]


def test_each_commit_is_said_and_recorded_at_once(world):
    w = world
    at_event = []

    def seen(e: Event) -> None:
        w.events.append(e)
        if e.event == "committed":
            status = json.loads((w.dest / ".ckptsync" / "status.json").read_text())
            at_event.append((e.checkpoint, sorted(p.name for p in w.dest.glob("checkpoint-*")), status["fetched"]))

    w.watch.on_event = seen
    w.watch.start()
    w.trainer.save(10, 20)
    w.watch.cycle()
    # the newest first; when its event is sent, status.json already names it and the older is not in yet
    assert at_event[0] == ("checkpoint-20", ["checkpoint-20"], ["checkpoint-20"])
    assert at_event[1] == ("checkpoint-10", ["checkpoint-10", "checkpoint-20"], ["checkpoint-20", "checkpoint-10"])


def test_a_link_cut_mid_file_is_one_outage_and_the_file_resumes(tmp_path):
    w = World(tmp_path, shard_bytes=24 << 20, compress="off")
    try:
        w.watch.start()
        w.trainer.save(10)
        offers, cuts = [], []

        def cut(value: dict) -> None:
            if value["member"] == "checkpoint-10/shard.bin" and not cuts:
                cuts.append(True)
                w.servers[0].cut_after(20 << 20)   # 20 of its 24 MiB arrive, then the link drops

        w.hooks.on_after("send_member", cut)
        w.hooks.on_before("send", lambda args: offers.append(dict(args["resume"] or {})))
        assert not w.watch.guarded(w.watch.cycle)    # the cycle was cut short, and the link restored
        assert w.clock.slept == [1.0]
        assert len(w.servers) == 2
        w.watch.cycle()
        assert w.committed() == ["checkpoint-10"]
        assert offers[-1]["checkpoint-10/shard.bin"][0] >= 16 << 20   # the kept prefix was not sent again
        assert tree_digest(w.dest / "checkpoint-10") == tree_digest(w.trainer.checkpoint(10))
        back = w.said("reconnected")
        assert len(back) == 1 and back[0].data["tries"] == 1 and back[0].data["seconds"] == 1.0
        assert "connection lost for 1 s" in back[0].message or "connection lost for 1" in back[0].message
    finally:
        w.close()


def test_reconnecting_waits_1s_doubling_to_60s_and_a_refused_login_ends_the_watch(world):
    w = world
    w.watch.start()
    failures = [ConnectError("cannot connect to tnr-0: Connection refused")] * 8

    def flaky() -> InProcessServer:
        if failures:
            raise failures.pop()
        return w.connect()

    w.watch.connect = flaky
    w.watch.reconnect(ConnectError("connection lost"))
    assert w.clock.slept == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert w.said("reconnected")[0].data == {"seconds": 243.0, "error": "connection lost", "tries": 9}
    for permanent in (LoginRefused("authentication failed for tnr-0"), HostKeyError("host key changed")):
        w.watch.connect = lambda exc=permanent: (_ for _ in ()).throw(exc)
        with pytest.raises(type(permanent)):
            w.watch.reconnect(ConnectError("connection lost"))


def test_the_disk_filling_releases_the_hold_and_says_why(world):
    w = world
    w.watch.start()
    w.trainer.save(10)
    cut = [True]

    def drop(args: dict) -> None:
        if cut:
            cut.pop()
            w.servers[-1].cut_after(0)

    w.hooks.on_before("send", drop)
    assert not w.watch.guarded(w.watch.cycle)       # held, then the link dropped before the copy
    assert (w.run / HOLD / "checkpoint-10").is_dir()
    full = {"free": 1 << 20, "total": 1 << 30}       # 1 MB free of 1 GB: under the 10 % kept free
    w.hooks.on_after("df", lambda value: value["reply"].update(full))
    w.watch.cycle()
    released = w.said("released")
    assert released[0].data["checkpoints"] == ["checkpoint-10"]
    assert "released to keep 107.4 MB free on the server" in released[0].data["reason"]
    assert not (w.run / HOLD).exists()
    assert w.committed() == ["checkpoint-10"]       # still there: backed up without a hold
    w.trainer.save(20)
    w.watch.cycle()
    assert not w.said("held")[1:]                    # nothing more is held while the disk is full
    assert w.committed() == ["checkpoint-10", "checkpoint-20"]


def test_end_of_training_is_said_with_the_checklist(world):
    w = world
    w.watch.start()
    w.trainer.save(10, 20)
    w.watch.cycle()
    assert not w.said("finished")
    w.trainer.stop()
    w.watch.cycle()
    finished = w.said("finished")
    assert len(finished) == 1 and finished[0].data["safe"]
    assert "; every checkpoint is backed up; checklist: SAFE" in finished[0].message
    assert finished[0].message.startswith("training finished at ")
    assert w.watch.result.finished and w.watch.result.exit_code == 0


def test_ctrl_c_releases_the_holds_and_exits_130(world):
    w = world
    w.trainer.save(10)

    def interrupt(args: dict) -> None:
        assert (w.run / HOLD / "checkpoint-10").is_dir()
        raise KeyboardInterrupt

    w.hooks.on_before("send", interrupt, times=1)
    with pytest.raises(Interrupted) as info:
        w.watch.run()
    assert info.value.exit_code == 130
    assert "released the holds of checkpoint-10" in info.value.message
    assert not (w.run / HOLD).exists()
    assert not DirectoryStore(w.dest).watcher()   # the watch's lock went with it


def test_holds_a_stopped_watch_left_are_taken_over(world):
    w = world
    w.trainer.save(10)
    with InProcessServer() as server:     # a watch that died after holding checkpoint-10
        listing = server.scan(str(w.run))
        server.hold(str(w.run), {"checkpoint-10": [f for f in listing.files if f.path.startswith("checkpoint-10/")]})
    w.trainer.save(20, 30, 40)            # and the trainer rotated it away
    assert not w.trainer.checkpoint(10).exists()
    w.watch.start()
    w.watch.cycle()
    assert w.said("adopted")[0].data["checkpoints"] == ["checkpoint-10"]
    assert "checkpoint-10" in w.committed()
    assert not (w.run / HOLD).exists()


# ---------------------------------------------------------------- completion, and waiting without inotify


def test_a_checkpoint_nobody_writes_is_complete_at_once(server_tree, tmp_path):
    """backup and list: where writers are seen, a checkpoint touched a moment ago that no process
    writes is complete; one a process holds open for writing is not, however old."""
    from ckptsync.backup import BackupOptions, run_backup
    from ckptsync.listing import run_list
    from helpers import open_for_writing

    a_second_ago = time.time() - 1                               # settle_seconds is 60
    os.utime(server_tree / "checkpoint-12" / "optimizer.pt", (a_second_ago, a_second_ago))
    target = make_target(server_tree, tmp_path / "b")
    rows = {r.name: r for r in run_list(target, local_only=False, connect=InProcessServer).rows}
    assert rows["checkpoint-12"].state == "complete", rows["checkpoint-12"].reason
    with open_for_writing(server_tree / "checkpoint-8" / "optimizer.pt"):
        result = run_backup(target, BackupOptions(names=["checkpoint-12", "checkpoint-8"]), connect=InProcessServer)
    assert result.fetched == ["checkpoint-12"]
    assert result.failed["checkpoint-8"] == "in progress: optimizer.pt is open for writing"


def test_without_inotify_the_agent_compares_walks(tmp_path, monkeypatch):
    from ckptsync.agent import watching

    def none():
        raise watching.NoInotify("no inotify here")

    monkeypatch.setattr(watching, "inotify_calls", none)
    watchers: dict = {}
    first = watching.op_wait({"root": str(tmp_path), "timeout": 5}, watchers)
    assert (first["how"], first["why"], first["changed"], first["started"]) == ("poll", "no inotify here", [], True)
    (tmp_path / "checkpoint-1").mkdir()
    (tmp_path / "checkpoint-1" / "a.bin").write_bytes(b"x")
    (tmp_path / ".ckptsync-hold").mkdir()                        # its own: not a change
    got = watching.op_wait({"root": str(tmp_path), "timeout": 5, "interval": 0.05}, watchers)
    assert got["changed"] == ["checkpoint-1", "checkpoint-1/a.bin"]
    assert watching.op_wait({"root": str(tmp_path), "timeout": 0}, watchers)["changed"] == []
    (tmp_path / "checkpoint-1" / "a.bin").unlink()
    assert watching.op_wait({"root": str(tmp_path), "timeout": 5}, watchers)["changed"] == [
        "checkpoint-1", "checkpoint-1/a.bin"]   # the directory's mtime moves with it


GB = 1 << 30


@pytest.mark.parametrize("pending, hold_max, free, make, release, unheld", [
    # the newest, up to hold_max
    ([("c50", False, False), ("c40", False, False), ("c30", False, False)], 2, 100 * GB, ["c50", "c40"], [], ["c30"]),
    # a hold whose original the trainer deleted is the only copy: never given up for newer ones
    ([("c70", False, False), ("c60", False, False), ("c40", True, True)], 2, 100 * GB, ["c70"], [], ["c60"]),
    ([("c70", False, False), ("c40", True, True), ("c30", True, True)], 2, 100 * GB, [], [], ["c70"]),
    # a hold the trainer still has costs nothing yet: given up for a newer one past hold_max
    ([("c70", False, False), ("c60", False, False), ("c40", True, False)], 2, 100 * GB, ["c70", "c60"], ["c40"], ["c40"]),
    # the disk: the oldest give way first, only copies included
    ([("c70", False, False), ("c40", True, True)], 3, 9 * GB, [], ["c40"], ["c40", "c70"]),
    ([("c70", False, False), ("c40", True, True)], 3, 11 * GB, ["c70"], [], []),
])
def test_the_hold_plan(pending, hold_max, free, make, release, unheld):
    from ckptsync.hold import Candidate, plan

    got = plan([Candidate(n, GB, held, gone) for n, held, gone in pending], free, 100 * GB, GB, hold_max)
    assert (got.make, sorted(got.release), sorted(got.unheld)) == (make, sorted(release), sorted(unheld))
