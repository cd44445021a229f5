"""Keeping `ckptsync watch` running on the laptop: a systemd user unit or a launchd agent. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass
from xml.sax.saxutils import escape

from ckptsync.result import Result

KINDS = ("systemd", "launchd")


@dataclass
class Service(Result):
    kind: str
    name: str          # the unit's or the agent's name
    path: str          # where to save it
    text: str
    steps: list[str]   # what to run then
    exit_code: int = 0


def unit_name(label: str) -> str:
    return "ckptsync-watch-" + re.sub(r"[^A-Za-z0-9_.-]", "-", label)


def systemd_word(word: str) -> str:
    """One ExecStart word as systemd reads it: quoted where it has to be, % doubled (a specifier)."""
    word = word.replace("%", "%%")
    if word and not re.search(r"[\s\"'\\;$]", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd(argv: list[str], label: str, workdir: str, env: dict[str, str]) -> Service:
    """A user unit that runs `argv` (the watch), restarted when it fails, except for the exit codes
    a restart cannot cure (usage 2, config 4, not found 10, locked 11, host key or login 20)."""
    name = unit_name(label)
    path = f"~/.config/systemd/user/{name}.service"
    lines = [
        "[Unit]",
        f"Description=ckptsync watch: back up the checkpoints of {label} as they are saved",
        "After=network-online.target",
        "Wants=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        f"WorkingDirectory={systemd_word(workdir)}",
        *(f"Environment={systemd_word(f'{k}={v}')}" for k, v in sorted(env.items())),
        "ExecStart=" + " ".join(systemd_word(w) for w in argv),
        "Restart=on-failure",
        "RestartSec=30",
        "RestartPreventExitStatus=2 4 10 11 20",
        "",
        "[Install]",
        "WantedBy=default.target",
        "",
    ]
    steps = [f"mkdir -p ~/.config/systemd/user && ckptsync watch ... --print-service systemd > {path}",
             "systemctl --user daemon-reload",
             f"systemctl --user enable --now {name}",
             f"journalctl --user -u {name} -f   (what it says)",
             "loginctl enable-linger $USER   (to keep it running while you are logged out)"]
    return Service("systemd", name, path, "\n".join(lines), steps)


def launchd(argv: list[str], label: str, workdir: str, env: dict[str, str], home: str) -> Service:
    """A launch agent that runs `argv` at login and again when it fails; its output goes to a log
    under ~/Library/Logs (launchd does not expand ~: `home` is written out)."""
    name = "io.ckptsync.watch." + re.sub(r"[^A-Za-z0-9_.-]", "-", label)
    path = f"~/Library/LaunchAgents/{name}.plist"
    log = f"~/Library/Logs/{unit_name(label)}.log"

    def string(value: str) -> str:
        return f"<string>{escape(value)}</string>"

    env_lines = []
    if env:
        env_lines = ["  <key>EnvironmentVariables</key>", "  <dict>"]
        for k, v in sorted(env.items()):
            env_lines += [f"    <key>{escape(k)}</key>", f"    {string(v)}"]
        env_lines.append("  </dict>")
    lines = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        '<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">',
        '<plist version="1.0">',
        "<dict>",
        "  <key>Label</key>", f"  {string(name)}",
        "  <key>ProgramArguments</key>", "  <array>", *(f"    {string(w)}" for w in argv), "  </array>",
        "  <key>WorkingDirectory</key>", f"  {string(workdir)}",
        *env_lines,
        "  <key>RunAtLoad</key>", "  <true/>",
        "  <key>KeepAlive</key>", "  <dict>", "    <key>SuccessfulExit</key>", "    <false/>", "  </dict>",
        "  <key>ThrottleInterval</key>", "  <integer>30</integer>",
        "  <key>StandardOutPath</key>", f"  {string(home + log[1:])}",
        "  <key>StandardErrorPath</key>", f"  {string(home + log[1:])}",
        "</dict>",
        "</plist>",
        "",
    ]
    steps = [f"ckptsync watch ... --print-service launchd > {path}",
             f"launchctl load -w {path}",
             f"tail -f {log}   (what it says)"]
    return Service("launchd", name, path, "\n".join(lines), steps)


def service(kind: str, argv: list[str], label: str, workdir: str, env: dict[str, str], home: str) -> Service:
    if kind == "systemd":
        return systemd(argv, label, workdir, env)
    return launchd(argv, label, workdir, env, home)
