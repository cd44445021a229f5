"""Turning the paths in requests into server paths, and the member names we accept."""

import os

from ckptsync.agent.frames import Failure


def resolve(root, rel=""):
    # A relative root is relative to the home directory, whatever the cwd the login gave us.
    base = os.path.join(os.path.expanduser("~"), _expand(root))
    if not rel:
        return base
    if "\x00" in rel:
        raise Failure("bad_path", "path contains a NUL byte")
    return os.path.normpath(os.path.join(base, _expand(rel)))


def _expand(path):
    # expanduser reads the environment on every call; a path without "~" has nothing to expand
    return os.path.expanduser(path) if path.startswith("~") else path


def safe_member(name):
    """A tar member name we accept for writing: relative, no '..', no empties."""
    if not name or not isinstance(name, str) or name.startswith("/") or "\x00" in name:
        return False
    parts = name.split("/")
    return all(p not in ("", ".", "..") for p in parts)
