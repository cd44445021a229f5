"""Joining the agent modules into the one source sent to the server (client side only).

The agent runs from memory under the server's python3, so its modules travel
as a single source: each module in dependency order, without the lines that
import a sibling, since every name then lives in one namespace.
"""

import ast
import functools
import pkgutil
import re
import zlib

# Dependency order: a module only imports from modules before it.
ORDER = (
    "frames", "hashing", "direct", "paths", "codec", "tar", "scan", "procs", "cpu", "probe",
    "sender", "reader", "fileops", "assemble", "http", "send", "watching", "hold", "serve",
)
SIBLING = re.compile(r"from ckptsync\.agent\.(\w+) import \w+(?:, \w+)*")
ENTRY = '\n\nif __name__ == "__main__":\n    main()\n'


def module_source(name):
    return pkgutil.get_data("ckptsync.agent", name + ".py").decode("utf-8")


def defined_names(tree):
    """Top-level names a module binds itself (its optional imports aside)."""
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names


def concat(sources):
    """One source from (name, text) pairs in ORDER, the sibling imports dropped (no checks)."""
    parts = ["# ckptsync agent: ckptsync/agent/*.py joined, see bundle.py\n"]
    done = []
    for name, text in sources:
        kept = []
        for number, line in enumerate(text.splitlines(), 1):
            match = SIBLING.fullmatch(line)
            if match:
                if match.group(1) not in done:
                    raise RuntimeError("%s.py:%d imports %s, which does not come before it" % (name, number, match.group(1)))
                continue
            kept.append(line)
        parts.append("# ---------------------------------------------------------------- %s.py\n" % name)
        parts.append("\n".join(kept).strip("\n") + "\n\n\n")
        done.append(name)
    return "".join(parts).rstrip("\n") + "\n" + ENTRY


def join(sources):
    """concat(), refusing what would not run the same joined.

    The checks parse every module, tens of milliseconds that every run would pay at connect:
    payload() uses concat() alone, and the tests check that join() accepts the shipped modules
    and gives the same source.
    """
    owner = {}
    for name, text in sources:
        for other in defined_names(ast.parse(text, name + ".py")):
            if other in owner:
                raise RuntimeError("agent modules %s and %s both define %s" % (owner[other], name, other))
            owner[other] = name
    source = concat(sources)
    for node in ast.walk(ast.parse(source, "ckptsync-agent")):
        modules = []
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [node.module or ""]
        for module in modules:
            if module.split(".")[0] == "ckptsync":
                raise RuntimeError("the joined agent still imports %s (line %d): write sibling imports as "
                                   "'from ckptsync.agent.NAME import A, B' on one line" % (module, node.lineno))
    return source


def sources():
    return [(name, module_source(name)) for name in ORDER]


@functools.lru_cache(maxsize=None)
def payload():
    """The agent as one Python source, ending by running main() when executed as __main__."""
    return concat(sources()).encode("utf-8")


@functools.lru_cache(maxsize=None)
def payload_compressed():
    """payload(), zlib-compressed: what the first stage reads and decompresses. Level 6, not 9:
    every run pays it, and 9 takes five times as long (16 ms against 3 here) for 1 % fewer bytes."""
    return zlib.compress(payload(), 6)
