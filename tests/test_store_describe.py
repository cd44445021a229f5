"""stores.describe: what a store location is and can do, told without opening it (no network,
no boto3), for completion, refusing a command and keying a cron entry."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ckptsync.config import Target
from ckptsync.datapath import check_command
from ckptsync.errors import ConfigError, UsageError
from ckptsync.stores import ABILITIES, describe, open_store
from ckptsync.target import PrintBack


@pytest.fixture
def no_boto3(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)   # `import boto3` fails, as where it is not installed


@pytest.mark.parametrize("where, kind, files_here, writes", [
    ("s3://team/runs/instance-1", "a bucket store", False, True),
    ("/backups/instance-1", "a backup directory", True, True),
    ("/backups/run.tar.zst", "an archive", True, False),
])
def test_describe_tells_the_kind_and_abilities_from_the_location(no_boto3, where, kind, files_here, writes):
    d = describe(where)
    assert (d.kind, d.key, d.can("files_here"), d.can("record_status")) == (kind, where, files_here, writes)


def test_describe_names_where_a_store_keeps_its_cron_log(no_boto3, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert describe("s3://team/runs/instance-1").log_dir == tmp_path / "state/ckptsync/team/runs/instance-1"
    assert describe(tmp_path / "b").log_dir == tmp_path / "b/.ckptsync"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert describe("~/b").key == str(tmp_path / "b")


def test_describe_agrees_with_the_opened_store(tmp_path):
    for where in (tmp_path / "b", tmp_path / "a.tar.zst"):
        store = open_store(where)
        assert describe(where).kind == store.kind
        assert describe(where).abilities == {n for n in ABILITIES if hasattr(store, n)}


def test_a_bucket_tells_what_a_cron_entry_carries_and_never_a_key(no_boto3):
    d = describe("s3://team/runs")
    assert "AWS_PROFILE" in d.environment and "AWS_SECRET_ACCESS_KEY" in d.secrets
    assert not set(d.environment) & set(d.secrets)
    assert describe("/backups").environment == describe("/backups").secrets == ()


def bucket_target(verb: str) -> Target:
    return Target(label="instance-1", transport=None, remote_dir="/run", local_dir=Path("s3:/team/instance-1"),
                  store_url="s3://team/instance-1", printed=PrintBack(verb=(verb,)))


def test_a_command_a_bucket_lacks_is_refused_before_its_client_is_needed(no_boto3):
    with pytest.raises(UsageError) as info:
        check_command(bucket_target("adopt"))
    assert info.value.message.startswith("adopt does not work on a bucket store (s3://team/instance-1); backup, list")
    with pytest.raises(ConfigError) as info:
        check_command(bucket_target("list"))
    assert "a bucket store needs boto3" in info.value.message
