"""Run first by every Python started with this folder on PYTHONPATH (`site` imports it).

It takes away what a Windows laptop's Python does not have: the POSIX-only modules and the
os functions below. A ckptsync started this way, and every Python it starts in turn (the agent
of the local transport inherits PYTHONPATH), has to get by with the fallbacks.
"""

import os
import sys
from importlib.abc import MetaPathFinder

MISSING_MODULES = frozenset({"fcntl", "pwd", "grp", "termios", "resource", "tty", "pty"})
MISSING_OS = ("getuid", "geteuid", "getgid", "getegid", "pwrite", "pread", "posix_fadvise")


class _Missing(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name in MISSING_MODULES:
            raise ModuleNotFoundError(f"No module named {name!r} (taken away by {__file__})", name=name)
        return None


for _name in MISSING_MODULES:
    sys.modules.pop(_name, None)
sys.meta_path.insert(0, _Missing())
for _name in MISSING_OS:
    if hasattr(os, _name):
        delattr(os, _name)
