"""The command-line interface: thin commands over the core, exit codes decided in one place."""

from ckptsync.cli.app import app, main

__all__ = ["app", "main"]
