"""ckptsync doctor"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ckptsync.cli import options as o
from ckptsync.cli.context import render
from ckptsync.output import Output, human

if TYPE_CHECKING:
    from ckptsync.doctor import DoctorResult


def doctor_cmd(
    instance: o.Instance = None, host: o.Host = None, remote_dir: o.RemoteDir = None,
    local_dir: o.LocalDir = None, config: o.Config = None, accept_new_host_key: o.AcceptNew = False,
) -> int:
    """Say what the server's python3 offers: hash, codec, their speed there, what is missing.

    Prints the server's python3 and its version, the hash and the codec it uses and how fast
    they run there (measured on a short sample in memory), the free space under remote_dir,
    whether the open files of other processes (a trainer still writing) can be seen, and the
    command that installs each missing piece.

    ckptsync works with the standard library alone and gives the same results; xxhash and
    zstandard on the server make it faster.
    """
    from ckptsync.doctor import run_doctor

    t = o.target(config, instance, host, remote_dir, local_dir, accept_new_host_key)
    return render(run_doctor(t), show_doctor)


def show_doctor(out: Output, r: DoctorResult) -> None:
    from ckptsync.doctor import CODECS

    out.result(f"server:  {r.server}")
    out.result(f"python3: {r.python} ({r.executable})")
    out.result(f"hash:    {r.hash}, {human(r.hash_rate)}/s on the server")
    codec = CODECS.get(r.codec, r.codec)
    out.result(f"codec:   {codec}" + (f", {human(r.codec_rate)}/s on the server" if r.codec_rate else ""))
    out.paragraph(f"{human(r.free_bytes)} free in {r.free_path}", indent="         ", first="space:   ")
    if r.writers_visible:
        seen = ("every other process's" if r.fd_readable == r.fd_total
                else f"{r.fd_readable} of {r.fd_total} other processes' (this user's)")
        out.paragraph(f"{seen} open files can be read: a checkpoint a trainer still writes is seen as in progress",
                      indent="         ", first="writers: ")
    else:
        out.paragraph("no other process's open files can be read here: a checkpoint still being written is "
                      "told only by its files (log in as the trainer's user, or as root, to see them)",
                      indent="         ", first="writers: ")
    if not r.missing:
        out.result("nothing missing: xxhash and zstd in process")
        return
    for m in r.missing:
        out.paragraph(f"{m.meaning}; install on the server: {m.fix}", indent="  ", first=f"no {m.piece}: ")
