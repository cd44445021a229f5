"""What docs/architecture.md says of the package's shape, checked on its source: the layer of
each module and what it may import, the modules that alone use a library, a system call or a
system path, and that nothing below the command line prints. Imports are read as in
tests/test_import_cycles.py (package_imports): at the top and inside functions, not under
`if TYPE_CHECKING:`."""

from __future__ import annotations

import ast
import sys

from package_imports import Import, imports, imports_in, package_module, sources, tree

# The layers, from the top: a module may import modules of its own layer and of those below it.
LAYERS = ["cli", "output", "core", "server", "transport", "shared", "agent"]
# A module is in the layer of the longest name here that is the module or a package holding it.
LAYER_OF = {
    "ckptsync": "core",                 # every module not named below
    "ckptsync.__main__": "cli",
    "ckptsync.cli": "cli",
    "ckptsync.output": "output",        # rendering: only the command line uses it, core never prints
    "ckptsync.progress_bar": "output",
    "ckptsync.server": "server",
    "ckptsync.transport": "transport",
    # used by every layer above, so they import only each other and the agent
    "ckptsync.errors": "shared",
    "ckptsync.progress": "shared",
    "ckptsync.policy": "shared",
    "ckptsync.disk": "shared",
    "ckptsync.osdeps": "shared",
    "ckptsync.liveness": "shared",
    "ckptsync.ratelimit": "shared",
    "ckptsync.agent": "agent",          # stdlib only: nothing of the package but its siblings
}

# What only some modules may do: import a library or a module (or anything inside it), call
# os.getuid, name a system path, exit, print. "x.*" is package x and every module in it.
PRINTS = {"ckptsync.__main__", "ckptsync.cli.*", "ckptsync.output", "ckptsync.progress_bar"}
ONLY_IN: dict[str, set[str]] = {
    "rich": {"ckptsync.output", "ckptsync.progress_bar"},
    "typer": {"ckptsync.cli.*"},
    "click": {"ckptsync.cli.*"},
    "yaml": {"ckptsync.config"},
    "paramiko": {"ckptsync.transport.ssh"},
    "xxhash": {"ckptsync.agent.hashing", "ckptsync.disk"},
    "zstandard": {"ckptsync.agent.codec",
                  "ckptsync.archive", "ckptsync.archive_read"},  # moves with the store redesign
    "compression": {"ckptsync.agent.codec"},     # Python 3.14's compression.zstd
    "boto3": {"ckptsync.s3.bucket",
              "ckptsync.s3"},              # moves with the store redesign
    "botocore": {"ckptsync.s3.bucket"},
    # the client's platform-specific calls live in osdeps; the agent, on the server, has its own
    "fcntl": {"ckptsync.osdeps", "ckptsync.agent.fileops"},
    "msvcrt": {"ckptsync.osdeps", "ckptsync.agent.fileops"},
    "pwd": {"ckptsync.osdeps"},
    "ctypes": {"ckptsync.osdeps", "ckptsync.agent.watching"},
    "os.getuid()": {"ckptsync.osdeps", "ckptsync.agent.probe"},
    "/proc": {"ckptsync.osdeps", "ckptsync.agent.cpu", "ckptsync.agent.direct", "ckptsync.agent.probe", "ckptsync.agent.procs"},
    "/run/user": {"ckptsync.osdeps"},
    # the wire stays inside server/: core never reads a frame
    "ckptsync.server.remote": {"ckptsync.server.*"},
    "ckptsync.server.agent_server": {"ckptsync.server.*"},
    "ckptsync.agent.frames": {"ckptsync.server.*", "ckptsync.agent.*"},
    "ckptsync.agent.serve": {"ckptsync.server.*", "ckptsync.agent.*"},
    # app.main() alone turns an error into an exit code
    "exit": {"ckptsync.cli.app"},
    # core never prints
    "print()": PRINTS,
    "sys.stdout": PRINTS | {"ckptsync.agent.serve"},  # the agent's frames go over its stdout
    "sys.stderr": PRINTS,
}

# What a command module (cli/cmd_<name>.py) may import at its top, besides the standard library,
# so that building the app for `--help` loads no core module (tests/test_startup.py runs it).
COMMAND_TOP = {"typer", "ckptsync.cli.options", "ckptsync.cli.context", "ckptsync.cli.shared",
               "ckptsync.cli.many", "ckptsync.errors", "ckptsync.output", "ckptsync.policy", "ckptsync.progress"}


def layer(module: str) -> str:
    name = module
    while name not in LAYER_OF:
        name = name.rpartition(".")[0]
    return LAYER_OF[name]


def allowed(module: str, where: set[str]) -> bool:
    return any(module == w or (w.endswith(".*") and (module + ".").startswith(w[:-1])) for w in where)


def uses(module: ast.Module, found: list[Import]) -> list[tuple[str, int, str]]:
    """(key of ONLY_IN, line, what it is) for each import, call, path or stream named in ONLY_IN."""
    out = [(k, i.line, f"imports {i.name}") for i in found for k in ONLY_IN
           if not k.startswith("/") and (i.name == k or i.name.startswith(k + "."))]
    for node in ast.walk(module):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
            out.append(("print()", node.lineno, "calls print()"))
        elif isinstance(node, ast.Name) and node.id == "SystemExit":
            out.append(("exit", node.lineno, "names SystemExit"))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in (("sys", "exit"), ("os", "_exit"), ("typer", "Exit")):
                out.append(("exit", node.lineno, f"calls {node.value.id}.{node.attr}"))
            elif node.value.id == "os" and node.attr in ("getuid", "geteuid"):
                out.append(("os.getuid()", node.lineno, f"calls os.{node.attr}"))
            elif node.value.id == "sys" and node.attr in ("stdout", "stderr", "__stdout__", "__stderr__"):
                out.append((f"sys.{node.attr.strip('_')}", node.lineno, f"writes sys.{node.attr}"))
        elif isinstance(node, ast.ImportFrom) and node.module in ("os", "sys"):
            for a in node.names:
                if a.name in ("getuid", "geteuid"):
                    out.append(("os.getuid()", node.lineno, f"imports os.{a.name}"))
                elif a.name in ("stdout", "stderr"):
                    out.append((f"sys.{a.name}", node.lineno, f"imports sys.{a.name}"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            for path in ("/proc", "/run/user"):
                if node.value == path or node.value.startswith(path + "/"):
                    out.append((path, node.lineno, f"names {node.value!r}"))
    return out


def misplaced(module: str, module_tree: ast.Module, found: list[Import]) -> list[str]:
    return [f"{module}:{line} {what}: {key} belongs only in {', '.join(sorted(ONLY_IN[key]))}"
            for key, line, what in sorted(uses(module_tree, found), key=lambda u: u[1])
            if not allowed(module, ONLY_IN[key])]


def upward(module: str, found: list[Import]) -> list[str]:
    """Each import of a module in a layer above this module's."""
    out = []
    for i in found:
        dep = package_module(i.name)
        if dep and LAYERS.index(layer(dep)) < LAYERS.index(layer(module)):
            out.append(f"{module}:{i.line} ({layer(module)}) imports {i.name} ({layer(dep)})")
    return out


def test_each_module_imports_only_its_own_layer_and_those_below():
    broken = [line for m in sources() for line in upward(m, list(imports(m)))]
    assert not broken, "imports against the layer order " + " -> ".join(LAYERS) + ":\n" + "\n".join(broken)


def test_libraries_system_calls_and_printing_stay_in_their_modules():
    broken = [line for m in sources() for line in misplaced(m, tree(m), list(imports(m)))]
    assert not broken, "\n".join(broken)


def test_command_modules_import_at_their_top_only_what_building_the_app_needs():
    broken = []
    for m in sources():
        if m.startswith("ckptsync.cli.cmd_"):
            for i in imports(m):
                top = i.name.split(".")[0]
                if i.at_top and top != "__future__" and top not in sys.stdlib_module_names and not (
                        top in COMMAND_TOP or package_module(i.name) in COMMAND_TOP):
                    broken.append(f"{m}:{i.line} imports {i.name} at its top")
    assert not broken, "\n".join(broken)


def test_every_module_has_a_layer_and_every_named_module_exists():
    assert set(LAYERS) == set(LAYER_OF.values())
    assert set(LAYER_OF) <= set(sources())
    named = {w.removesuffix(".*") for where in ONLY_IN.values() for w in where} | COMMAND_TOP - {"typer"}
    assert named <= set(sources()), sorted(named - set(sources()))


def test_the_checks_see_what_made_up_modules_do():
    source = ("import os\nfrom rich.table import Table\nfrom typing import TYPE_CHECKING\n"
              "if TYPE_CHECKING:\n    import paramiko\n"
              "def f():\n    import ckptsync.cli.app\n    print(os.getuid(), f'/proc/{1}/fd')\n"
              "    raise SystemExit(1)\n")
    module = ast.parse(source)
    found = imports_in(module, ["ckptsync"], sources())
    assert misplaced("ckptsync.backup", module, found) == [
        "ckptsync.backup:2 imports rich.table: rich belongs only in ckptsync.output, ckptsync.progress_bar",
        "ckptsync.backup:8 calls print(): print() belongs only in ckptsync.__main__, ckptsync.cli.*, "
        "ckptsync.output, ckptsync.progress_bar",
        "ckptsync.backup:8 calls os.getuid: os.getuid() belongs only in ckptsync.agent.probe, ckptsync.osdeps",
        "ckptsync.backup:8 names '/proc/': /proc belongs only in ckptsync.agent.cpu, ckptsync.agent.direct, "
        "ckptsync.agent.probe, ckptsync.agent.procs, ckptsync.osdeps",
        "ckptsync.backup:9 names SystemExit: exit belongs only in ckptsync.cli.app",
    ]
    osdeps = ast.parse("import ctypes\nopen('/proc/cpuinfo')")
    assert misplaced("ckptsync.osdeps", osdeps, [Import("ctypes", 1, True)]) == []
    assert upward("ckptsync.backup", found) == ["ckptsync.backup:7 (core) imports ckptsync.cli.app (cli)"]
    assert upward("ckptsync.agent.scan", [Import("ckptsync.errors", 3, True)]) == [
        "ckptsync.agent.scan:3 (agent) imports ckptsync.errors (shared)"]
    assert upward("ckptsync.cli.app", found) == []


# A command never asks which kind of store it is on: it asks the store (stores.describe, or an
# ability of the opened store). These names tell the kind from the location.
KIND_OF_STORE = {"store_url", "is_store_url"}


def store_kind_reads(module_tree: ast.Module) -> list[tuple[int, str]]:
    """(line, what) for each read of a target's store_url or use of is_store_url."""
    out = []
    for node in ast.walk(module_tree):
        if isinstance(node, ast.Attribute) and node.attr in KIND_OF_STORE:
            out.append((node.lineno, f"reads .{node.attr}"))
        elif isinstance(node, ast.Name) and node.id in KIND_OF_STORE:
            out.append((node.lineno, f"uses {node.id}"))
        elif isinstance(node, ast.ImportFrom):
            out += [(node.lineno, f"imports {a.name}") for a in node.names if a.name in KIND_OF_STORE]
    return sorted(out)


def test_command_modules_do_not_tell_the_kind_of_store_from_its_location():
    broken = [f"{m}:{line} {what}" for m in sources() if m.startswith("ckptsync.cli.")
              for line, what in store_kind_reads(tree(m))]
    assert not broken, "ask stores.describe(target) what the store can do:\n" + "\n".join(broken)


def test_the_store_kind_check_sees_a_made_up_command():
    source = ("from ckptsync.config import is_store_url\n"
              "def run(t):\n    if t.store_url or is_store_url(str(t.local_dir)):\n        return 0\n")
    assert store_kind_reads(ast.parse(source)) == [
        (1, "imports is_store_url"), (3, "reads .store_url"), (3, "uses is_store_url")]


def results_outside_the_base(modules: dict[str, ast.Module]) -> list[str]:
    """Classes that give an exit code (a field, an attribute or a property) and their own `to_dict`
    (what --json prints) without being a `result.Result`, known by the names of their bases; the
    error hierarchy is the other home of exit codes. A record read back from a file (`from_dict`:
    a run's status) keeps an exit code a past run gave, and is not a result."""
    classes = [node for m in modules.values() for node in ast.walk(m) if isinstance(node, ast.ClassDef)]

    def bases(node: ast.ClassDef) -> set[str]:
        return {b.id if isinstance(b, ast.Name) else b.attr for b in node.bases
                if isinstance(b, (ast.Name, ast.Attribute))}

    results, errors = {"Result"}, {"Exception", "CkptsyncError"}
    for _ in classes:
        results |= {c.name for c in classes if bases(c) & results}
        errors |= {c.name for c in classes if bases(c) & errors}

    def renders_exit_code(node: ast.ClassDef) -> bool:
        methods = {item.name for item in node.body if isinstance(item, ast.FunctionDef)}
        if "to_dict" not in methods or "from_dict" in methods:
            return False
        for item in node.body:
            target = item.target if isinstance(item, ast.AnnAssign) else None
            names = [t.id for t in item.targets if isinstance(t, ast.Name)] if isinstance(item, ast.Assign) else []
            if (isinstance(target, ast.Name) and target.id == "exit_code") or "exit_code" in names \
                    or (isinstance(item, ast.FunctionDef) and item.name == "exit_code"):
                return True
        return False

    return sorted(f"{m}.{c.name}" for m, module in modules.items() for c in ast.walk(module)
                  if isinstance(c, ast.ClassDef) and renders_exit_code(c) and c.name not in results | errors)


def test_every_result_shares_one_base_for_its_exit_code_and_json():
    assert results_outside_the_base({m: tree(m) for m in sources()}) == []


def test_a_result_outside_the_base_is_named():
    module = ast.parse("class Result: ...\n@dataclass\nclass A(Result):\n    exit_code: int = 0\n"
                       "class B(A):\n    @property\n    def exit_code(self): return 3\n    def to_dict(self): ...\n"
                       "class Loose:\n    exit_code = 0\n    def to_dict(self): ...\n"
                       "class Item:\n    exit_code: int = 0\n"
                       "class Record:\n    exit_code: int\n    def to_dict(self): ...\n"
                       "    @classmethod\n    def from_dict(cls, data): ...\n"
                       "class Bad(CkptsyncError, exit_code=5):\n    def to_dict(self): ...\n")
    assert results_outside_the_base({"ckptsync.x": module}) == ["ckptsync.x.Loose"]
