"""Relative path -> [size, sha256] of the files under a directory: what the trainer saved
(bench/tiny_train.py, in the benchmark's venv) and what was backed up (bench/trainer.py) are
compared through it. Standard library only, so both can import it."""

import hashlib
import os


def sha256_tree(root):
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[os.path.relpath(path, root)] = [os.path.getsize(path), h.hexdigest()]
    return out
