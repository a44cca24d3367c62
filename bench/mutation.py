"""A sampled mutation run over the device's code: boot.py, update_boot_status.py, entomologist/.

Mutants come from each file's AST; a mutant replaces the source span of one node
(the rest of the file keeps its text).  A seeded random sample of them runs, each in
a private copy of the repository, against only the tests that execute its line:
which tests execute which line is measured once with coverage.py (per test, in the
pytest process and in the scripts it starts as processes) and cached in
bench/results/ under the sources' hash.

    python bench/mutation.py [--seed 20] [--per-lines 17] [--module boot.py ...] [--jobs 2]

Outcomes: killed (a test failed), timeout (the tests ran past 3x their normal time:
killed too, reported apart), survived, no-coverage (no test executes the line: a
survivor), not-compiling (skipped, not counted).
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "mutation.json"
PACKAGE = "entomologist"
SCRIPTS = ("boot.py", "update_boot_status.py")

SWAP_COMPARE = {ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt,
                ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.In: ast.NotIn, ast.NotIn: ast.In,
                ast.Is: ast.IsNot, ast.IsNot: ast.Is}
SWAP_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult,
              ast.FloorDiv: ast.Mod, ast.Mod: ast.FloorDiv}
# Logging calls at debug level only explain; deleting one changes nothing a camera does.
QUIET_CALLS = {"debug"}


# ---------------------------------------------------------------- generation

@dataclass(frozen=True)
class Mutant:
    module: str
    line: int
    col: int
    end_line: int
    end_col: int
    operator: str
    original: str
    mutated: str
    stmt_line: int  # the first line of the statement that holds the node
    # For a statement that runs only on import (a module constant, a default value, a
    # class field): the lines that use what it defines, whose tests are the ones to run.
    uses: tuple[int, ...] = ()
    func_level: bool = True  # inside a function body (not run on import)

    @property
    def key(self) -> str:
        return f"{self.module}:{self.line}:{self.col}:{self.operator}:{self.mutated}"


def _char_col(line: str, byte_col: int) -> int:
    """AST columns count UTF-8 bytes."""
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="replace"))


def _offsets(source: str) -> list[int]:
    starts, pos = [0], 0
    for line in source.splitlines(keepends=True):
        pos += len(line)
        starts.append(pos)
    return starts


def span(source: str, node, lines: list[str] | None = None,
         starts: list[int] | None = None) -> tuple[int, int]:
    """Character offsets [start, end) of a node in source."""
    lines = lines if lines is not None else source.splitlines(keepends=True)
    starts = starts if starts is not None else _offsets(source)
    start = starts[node.lineno - 1] + _char_col(lines[node.lineno - 1], node.col_offset)
    end = starts[node.end_lineno - 1] + _char_col(lines[node.end_lineno - 1], node.end_col_offset)
    return start, end


def apply(source: str, mutant: Mutant) -> str:
    lines = source.splitlines(keepends=True)
    starts = _offsets(source)
    start = starts[mutant.line - 1] + _char_col(lines[mutant.line - 1], mutant.col)
    end = starts[mutant.end_line - 1] + _char_col(lines[mutant.end_line - 1], mutant.end_col)
    if source[start:end] != mutant.original:
        raise ValueError(f"{mutant.key}: the source changed under the mutant")
    return source[:start] + mutant.mutated + source[end:]


def _is_docstring(node, parent) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str))


def _is_main_guard(test) -> bool:
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and len(test.comparators) == 1
            and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == "__main__")


def _is_type_checking(test) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _is_quiet_call(stmt) -> bool:
    return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
            and isinstance(stmt.value.func, ast.Attribute) and stmt.value.func.attr in QUIET_CALLS)


def _assigns_all(stmt) -> bool:
    targets = (stmt.targets if isinstance(stmt, ast.Assign)
               else [stmt.target] if isinstance(stmt, (ast.AnnAssign, ast.AugAssign)) else [])
    return any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets)


class _Generator:
    def __init__(self, module: str, source: str):
        self.module, self.source = module, source
        self.lines = source.splitlines(keepends=True)
        self.starts = _offsets(source)
        self.out: list[Mutant] = []
        self.func_depth = 0
        self.functions: list[ast.AST] = []
        self.classes: list[str] = []
        self.name_lines: dict[str, set[int]] = {}
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                self.name_lines.setdefault(node.id, set()).add(node.lineno)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                self.name_lines.setdefault(node.attr, set()).add(node.lineno)
            elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
                self.name_lines.setdefault(node.target.id, set()).add(node.lineno)  # reads it too

    def text(self, node) -> str:
        start, end = span(self.source, node, self.lines, self.starts)
        return self.source[start:end]

    def add(self, node, operator: str, mutated: str, stmt) -> None:
        original = self.text(node)
        if mutated == original:
            return
        self.out.append(Mutant(self.module, node.lineno, node.col_offset, node.end_lineno,
                               node.end_col_offset, operator, original, mutated, stmt.lineno,
                               self.uses(stmt), self.func_depth > 0))

    def uses(self, stmt) -> tuple[int, ...]:
        """The lines that read what ``stmt`` defines: a function's body for its
        defaults, a class's users for its fields, the readers of an assigned name
        (in its function for a local) or attribute."""
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return tuple(range(stmt.body[0].lineno, stmt.end_lineno + 1))
        targets = (stmt.targets if isinstance(stmt, ast.Assign)
                   else [stmt.target] if isinstance(stmt, (ast.AnnAssign, ast.AugAssign))
                   else [])
        names: set[str] = set() if self.func_depth else set(self.classes[-1:])
        attributes: set[str] = set()
        for target in targets:
            for node in ast.walk(target):
                if isinstance(node, ast.Attribute):
                    attributes.add(node.attr)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    names.add(node.id)
        lines = set().union(*(self.name_lines.get(n, set()) for n in names | attributes))
        if self.func_depth:
            scope = self.functions[-1]
            local = {l for l in set().union(*(self.name_lines.get(n, set()) for n in names))
                     if scope.lineno <= l <= scope.end_lineno}
            lines = local | set().union(*(self.name_lines.get(a, set()) for a in attributes))
        return tuple(sorted(lines - {stmt.lineno}))

    # Fields that hold type annotations: never mutated.
    ANNOTATION_FIELDS = {"annotation", "returns", "type_comment"}

    def visit_body(self, body: list, stmt_parent) -> None:
        for index, stmt in enumerate(body):
            if index == 0 and _is_docstring(stmt, stmt_parent):
                continue
            self.visit_stmt(stmt)

    def visit_stmt(self, stmt) -> None:
        if _assigns_all(stmt):
            return
        if isinstance(stmt, ast.If) and (_is_main_guard(stmt.test) or _is_type_checking(stmt.test)):
            return
        # Statement deletion.
        deletable = (isinstance(stmt, (ast.Raise, ast.Assign, ast.AugAssign))
                     or (isinstance(stmt, ast.AnnAssign) and stmt.value is not None)
                     or (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
                         and not _is_quiet_call(stmt)))
        if deletable:
            self.add(stmt, "delete-statement", "pass", stmt)
        if isinstance(stmt, ast.Return) and stmt.value is not None and not (
                isinstance(stmt.value, ast.Constant) and stmt.value.value is None):
            self.add(stmt.value, "return-none", "None", stmt)
        if isinstance(stmt, ast.If):
            self.add(stmt.test, "negate-if", f"not ({self.text(stmt.test)})", stmt)
        # Expressions of this statement (not of nested statements), then nested bodies.
        for name, value in ast.iter_fields(stmt):
            if name in self.ANNOTATION_FIELDS:
                continue
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and name == "args":
                self.visit_arguments(value, stmt)
                continue
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and name == "body":
                self.func_depth += 1
                self.functions.append(stmt)
                self.visit_body(value, stmt)
                self.functions.pop()
                self.func_depth -= 1
                continue
            if isinstance(stmt, ast.ClassDef) and name == "body":
                self.classes.append(stmt.name)
                self.visit_body(value, stmt)
                self.classes.pop()
                continue
            self.visit_field(value, stmt, stmt)

    def visit_arguments(self, args: ast.arguments, stmt) -> None:
        # Defaults are code; the annotations of the arguments are not.
        for default in [*args.defaults, *(d for d in args.kw_defaults if d is not None)]:
            self.visit_expr(default, stmt)

    def visit_field(self, value, parent, stmt) -> None:
        """One field of ``parent``: a body of statements, or the expressions and other
        nodes (handlers, withitems, match cases, keywords) of ``stmt``."""
        items = value if isinstance(value, list) else [value]
        if items and all(isinstance(i, ast.stmt) for i in items):
            self.visit_body(items, parent)
            return
        for item in items:
            if isinstance(item, ast.stmt):
                self.visit_stmt(item)
            elif isinstance(item, ast.expr):
                self.visit_expr(item, stmt)
            elif isinstance(item, ast.AST):
                self.visit_other(item, stmt)

    def visit_other(self, node, stmt) -> None:
        for name, value in ast.iter_fields(node):
            if name not in self.ANNOTATION_FIELDS:
                self.visit_field(value, node, stmt)

    def visit_expr(self, node, stmt) -> None:
        if isinstance(node, ast.JoinedStr):
            # Inside an f-string only the replacement fields are code; their format
            # specs are text.
            for value in node.values:
                if isinstance(value, ast.FormattedValue):
                    self.visit_expr(value.value, stmt)
            return
        if isinstance(node, ast.Compare):
            for index, op in enumerate(node.ops):
                swapped = SWAP_COMPARE.get(type(op))
                if swapped:
                    copy = ast.Compare(left=node.left, ops=list(node.ops),
                                       comparators=node.comparators)
                    copy.ops[index] = swapped()
                    self.add(node, "compare", ast.unparse(copy), stmt)
        elif isinstance(node, ast.BoolOp):
            other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            self.add(node, "and-or", ast.unparse(ast.BoolOp(op=other, values=node.values)), stmt)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            self.add(node, "remove-not", f"({self.text(node.operand)})", stmt)
        elif isinstance(node, ast.BinOp) and type(node.op) in SWAP_BINOP:
            self.add(node, "arithmetic",
                     ast.unparse(ast.BinOp(left=node.left, op=SWAP_BINOP[type(node.op)](),
                                           right=node.right)), stmt)
        elif isinstance(node, ast.Constant):
            if node.value is True or node.value is False:
                self.add(node, "true-false", str(not node.value), stmt)
            elif type(node.value) is int:
                self.add(node, "int+1", str(node.value + 1), stmt)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.expr):
                self.visit_expr(child, stmt)
            elif isinstance(child, ast.AST):
                self.visit_other(child, stmt)


def generate(module: str, source: str) -> list[Mutant]:
    """Every mutant of a module, in source order."""
    tree = ast.parse(source)
    gen = _Generator(module, source)
    gen.visit_body(tree.body, tree)
    return sorted(set(gen.out), key=lambda m: (m.line, m.col, m.operator, m.mutated))


def compiles(source: str, module: str) -> bool:
    try:
        compile(source, module, "exec", dont_inherit=True)
    except (SyntaxError, ValueError):
        return False
    return True


def sample(mutants: list[Mutant], count: int, seed: int, module: str) -> list[Mutant]:
    """A seeded sample: the same seed and source give the same mutants."""
    if count >= len(mutants):
        return list(mutants)
    rng = random.Random(f"{seed}:{module}")
    chosen = rng.sample(range(len(mutants)), count)
    return [mutants[i] for i in sorted(chosen)]


def sample_size(source: str, per_lines: int) -> int:
    return max(4, len(source.splitlines()) // per_lines)


def product_modules(root: Path = ROOT) -> list[str]:
    return [*SCRIPTS, *sorted(str(p.relative_to(root)) for p in (root / PACKAGE).glob("*.py"))]


# ---------------------------------------------------------------- line -> tests map

SITECUSTOMIZE = textwrap.dedent('''\
    # Written by bench/mutation.py for its coverage pass only: measure a script the
    # current test started, under that test's id.
    import os as _os
    _test = _os.environ.get("MUTATION_TEST_ID")
    _dir = _os.environ.get("MUTATION_COVERAGE_DIR")
    if _test and _dir:
        try:
            import coverage as _coverage
        except ImportError:
            pass
        else:
            _cov = _coverage.Coverage(data_file=_os.path.join(_dir, "child"), data_suffix=True,
                                      context=_test, config_file=False,
                                      include=_os.environ["MUTATION_INCLUDE"].split(":"))
            _cov.start()
            import atexit as _atexit

            def _save():
                _cov.stop()
                _cov.save()
            _atexit.register(_save)
            # A process that ends with os._exit (a second signal) skips atexit.
            _real_exit = _os._exit

            def _exit(code):
                try:
                    _save()
                finally:
                    _real_exit(code)
            _os._exit = _exit
            # A SIGTERM ends the process without atexit: save first, then die as before.
            import signal as _signal
            if _signal.getsignal(_signal.SIGTERM) == _signal.SIG_DFL:
                def _term(signum, frame):
                    _save()
                    _signal.signal(signum, _signal.SIG_DFL)
                    _os.kill(_os.getpid(), signum)
                _signal.signal(_signal.SIGTERM, _term)
    ''')

PLUGIN = textwrap.dedent('''\
    """Loaded with -p by bench/mutation.py for its coverage pass only: each test's lines
    under its node id, in this process and in the processes the test starts."""
    import json
    import os
    import time

    import coverage
    import pytest

    _state = {}


    def pytest_configure(config):
        directory = os.environ["MUTATION_COVERAGE_DIR"]
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        cov = coverage.Coverage(data_file=os.path.join(directory, "inproc." + worker),
                                config_file=False,
                                include=os.environ["MUTATION_INCLUDE"].split(":"))
        cov.start()
        _state.update(cov=cov, worker=worker, dir=directory, tests={})


    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(item, nextitem):
        _state["cov"].switch_context(item.nodeid)
        os.environ["MUTATION_TEST_ID"] = item.nodeid
        started = time.monotonic()
        yield
        os.environ.pop("MUTATION_TEST_ID", None)
        _state["cov"].switch_context("")
        record = _state["tests"].setdefault(item.nodeid, {"outcome": "passed"})
        record["seconds"] = time.monotonic() - started


    def pytest_runtest_logreport(report):
        if report.failed:
            _state["tests"].setdefault(report.nodeid, {})["outcome"] = "failed"


    def pytest_unconfigure(config):
        cov = _state.get("cov")
        if cov is None:
            return
        cov.stop()
        cov.save()
        with open(os.path.join(_state["dir"], "tests." + _state["worker"] + ".json"), "w") as f:
            json.dump(_state["tests"], f)
    ''')


def sources_hash(root: Path, modules: list[str]) -> str:
    digest = hashlib.sha256()
    for path in sorted(set(product_modules(root)) | set(modules)):
        digest.update(path.encode() + b"\0" + (root / path).read_bytes())
    return digest.hexdigest()[:16]


def measure_coverage(root: Path, python: str, jobs: int, pytest_args: list[str]) -> dict:
    """Run the suite once under coverage: {module: {line: [test ids]}} and each test's time."""
    work = Path(tempfile.mkdtemp(prefix="mutation-cov-"))
    os.chmod(work, 0o755)
    hook = work / "hook"
    data = work / "data"
    hook.mkdir()
    data.mkdir()
    os.chmod(data, 0o1777)  # a test may start a script as another user
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (hook / "mutation_coverage_plugin.py").write_text(PLUGIN)
    include = [str(root / m) for m in product_modules(root)]
    env = {**os.environ, "MUTATION_COVERAGE_DIR": str(data), "MUTATION_INCLUDE": ":".join(include),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    env.pop("MUTATION_TEST_ID", None)
    cmd = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           "-p", "mutation_coverage_plugin", "-m", "not slow", *pytest_args]
    if jobs > 1:
        cmd += ["-n", str(jobs), "--dist", "worksteal"]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=root, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)
    seconds = time.monotonic() - started
    tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    print(f"coverage pass: {seconds:.0f} s, pytest exit {proc.returncode}: {' '.join(tail)}")

    mapping = read_coverage(data, root)
    shutil.rmtree(work, ignore_errors=True)
    return {"seconds": seconds, "exit": proc.returncode, **mapping}


def read_coverage(data: Path, root: Path) -> dict:
    """The pass's data files -> each test's time and outcome, and {module: {line: tests}}."""
    from coverage import CoverageData
    from coverage.exceptions import DataError

    tests: dict[str, dict] = {}
    for path in data.glob("tests.*.json"):
        for test, record in json.loads(path.read_text()).items():
            merged = tests.setdefault(test, {"outcome": "passed"})
            merged.update({k: v for k, v in record.items() if k != "outcome"})
            if record.get("outcome") == "failed":
                merged["outcome"] = "failed"
    lines: dict[str, dict[int, set[str]]] = {}
    import_lines: dict[str, set[int]] = {}
    unreadable = 0
    for path in sorted(data.iterdir()):
        if not (path.name.startswith("inproc.") or path.name.startswith("child.")):
            continue
        cov_data = CoverageData(basename=str(path))
        try:
            cov_data.read()
            measured_files = cov_data.measured_files()
            by_file = {f: cov_data.contexts_by_lineno(f) or {} for f in measured_files}
        except DataError:
            # A script the test killed (SIGKILL, a power cut) while it saved its data.
            unreadable += 1
            continue
        for measured, by_line in by_file.items():
            module = os.path.relpath(measured, root)
            for lineno, contexts in by_line.items():
                ids = {c for c in contexts if c}
                lines.setdefault(module, {}).setdefault(lineno, set()).update(ids)
                if "" in contexts:
                    import_lines.setdefault(module, set()).add(lineno)
    # A line run only while the test process imported the module (a def, a module
    # constant, a default value) matters to every test that uses the module.
    for module, numbers in import_lines.items():
        users = set().union(*lines[module].values())
        for lineno in numbers:
            if not lines[module][lineno]:
                lines[module][lineno] = set(users)
    failed = {t for t, r in tests.items() if r.get("outcome") != "passed"}
    return {"failed": sorted(failed), "unreadable_data_files": unreadable,
            "tests": {t: round(r.get("seconds", 0.0), 3) for t, r in tests.items() if "seconds" in r},
            "lines": {m: {str(n): sorted(ids - failed) for n, ids in sorted(by_line.items())}
                      for m, by_line in sorted(lines.items())}}


def load_map(root: Path, python: str, jobs: int, cache_dir: Path, rebuild: bool,
             pytest_args: list[str]) -> dict:
    key = sources_hash(root, product_modules(root))
    path = cache_dir / f"mutation-lines-{key}.json"
    if path.exists() and not rebuild:
        return json.loads(path.read_text())
    mapping = measure_coverage(root, python, jobs, pytest_args)
    mapping["key"] = key
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(mapping))
    os.replace(tmp, path)
    return mapping


def is_unit(test: str) -> bool:
    return test.startswith("tests/unit/")


_TEST_SOURCES: dict[str, str] = {}  # a cache: one run reads a test file once


def still_exists(test: str, root: Path = ROOT) -> bool:
    """A test renamed or removed since the map was measured is left out."""
    path, _, name = test.partition("::")
    key = str(root / path)
    if key not in _TEST_SOURCES:
        try:
            _TEST_SOURCES[key] = (root / path).read_text()
        except OSError:
            _TEST_SOURCES[key] = ""
    return f"def {name.split('[')[0].split('::')[-1]}(" in _TEST_SOURCES[key]


def covering_tests(mapping: dict, mutant: Mutant, exists=still_exists) -> list[str]:
    """The tests that run the mutant's lines, unit tests first, then the fastest first."""
    by_line = mapping["lines"].get(mutant.module, {})
    ids: set[str] = set()
    for lineno in {mutant.stmt_line, *range(mutant.line, mutant.end_line + 1)}:
        ids.update(by_line.get(str(lineno), ()))
    # The tests that also read what the mutated statement defines come first.
    readers: set[str] = set()
    for lineno in mutant.uses:
        readers.update(by_line.get(str(lineno), ()))
    if mutant.func_level:
        readers &= ids
    times = mapping["tests"]
    ids = {t for t in ids if exists(t)}
    readers = {t for t in readers if exists(t)}

    def cheapest(tests):
        return sorted(tests, key=lambda t: (not is_unit(t), times.get(t, 60.0), t))
    if not mutant.func_level and readers:
        return cheapest(readers)  # import-time code: every importer "covers" it
    return cheapest(readers) + cheapest(ids - readers)


# ---------------------------------------------------------------- running

@dataclass
class Outcome:
    module: str
    line: int
    operator: str
    original: str
    mutated: str
    outcome: str
    killed_by: str | None = None
    seconds: float = 0.0
    tests_run: int = 0
    tests_covering: int = 0
    col: int = 0
    detail: str = ""


def copy_tree(root: Path, dest: Path) -> None:
    # Tracked files and new ones not ignored (a test being written); no __pycache__.
    files = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"], capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = root / name
        if not src.is_file():
            continue
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


FAILED_RE = re.compile(r"^(?:FAILED|ERROR) (tests/.+?)(?: - .*)?$", re.M)


def run_tests(copy: Path, python: str, tests: list[str], timeout: float) -> tuple[str, str | None, str]:
    """('killed' | 'survived' | 'timeout' | 'error', the failing test, the output's tail)."""
    if os.sep in python:  # a path from here: the tests run in the copy
        python = os.path.abspath(python)
    cmd = [python, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           "-p", "no:xdist", *tests]
    # No bytecode kept: a .pyc is trusted on its source's size and mtime in whole
    # seconds, and a mutant often has both of the original's (`<` for `>`).
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen(cmd, cwd=copy, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", None, ""
    tail = "\n".join(out.strip().splitlines()[-3:])
    if proc.returncode == 0:
        return "survived", None, tail
    if proc.returncode in (1, 2):  # a test failed, or the mutant broke collection (an import)
        failed = FAILED_RE.search(out)
        return "killed", failed.group(1) if failed else "collection", tail
    if proc.returncode in (3, 4) and "ERROR: not found" not in out:
        # The mutant broke a module a conftest imports: pytest cannot even start. These
        # tests pass without it (the coverage pass), so this is a kill.
        return "killed", f"pytest exit {proc.returncode} (conftest import)", tail
    if proc.returncode < 0:
        # pytest itself died of a signal (a crash in a C library the mutant fed): the
        # tests pass without the mutant, so this is a kill too.
        return "killed", f"pytest killed by signal {-proc.returncode}", tail
    return "error", None, tail


def run_mutant(mutant: Mutant, copy: Path, python: str, mapping: dict, first: int,
               max_tests: int, forced: list[str] | None = None) -> Outcome:
    result = Outcome(mutant.module, mutant.line, mutant.operator, mutant.original,
                     mutant.mutated, "survived", col=mutant.col)
    path = copy / mutant.module
    original = path.read_text()
    mutated = apply(original, mutant)
    if not compiles(mutated, mutant.module):
        result.outcome = "not-compiling"
        return result
    tests = forced or covering_tests(mapping, mutant)
    result.tests_covering = len(tests)
    if not tests:
        result.outcome = "no-coverage"
        return result
    started = time.monotonic()
    try:
        path.write_text(mutated)
        # The second batch keeps room for processes (integration tests): a line every
        # unit test runs may be one only a real connection tells apart.
        rest = tests[first:]
        room = max_tests - first
        integration = [t for t in rest if not is_unit(t)][:max(room // 3, 1)]
        units = [t for t in rest if is_unit(t)][:room - len(integration)]
        # Room the unit tests leave goes to more integration tests.
        integration = [t for t in rest if not is_unit(t)][:room - len(units)]
        for batch in (tests[:first], [t for t in rest if t in set(units + integration)]):
            if not batch:
                continue
            normal = sum(mapping["tests"].get(t, 10.0) for t in batch)
            outcome, killer, tail = run_tests(copy, python, batch, timeout=3 * normal + 30)
            result.tests_run += len(batch)
            result.outcome, result.killed_by, result.detail = outcome, killer, tail
            if outcome != "survived":
                break
    finally:
        path.write_text(original)
    result.seconds = round(time.monotonic() - started, 2)
    return result


def table(outcomes: list[Outcome], modules: list[str]) -> str:
    rows = [("module", "mutants", "killed", "timeout", "survived", "no-cov", "ratio")]
    totals = [0, 0, 0, 0, 0]

    def row(name, counts):
        compiled, killed, timeout, survived, nocov = counts
        ratio = f"{100 * (killed + timeout) / compiled:.1f} %" if compiled else "-"
        return (name, str(compiled), str(killed), str(timeout), str(survived), str(nocov), ratio)

    for module in modules:
        mine = [o for o in outcomes if o.module == module and o.outcome != "not-compiling"]
        counts = [len(mine), sum(o.outcome == "killed" for o in mine),
                  sum(o.outcome == "timeout" for o in mine),
                  sum(o.outcome in ("survived", "error") for o in mine),
                  sum(o.outcome == "no-coverage" for o in mine)]
        totals = [a + b for a, b in zip(totals, counts)]
        rows.append(row(module, counts))
    rows.append(row("total", totals))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


def ratio(outcomes: list[Outcome]) -> float | None:
    """(killed + timeout) / compiled mutants."""
    compiled = [o for o in outcomes if o.outcome != "not-compiling"]
    killed = sum(o.outcome in ("killed", "timeout") for o in compiled)
    return round(killed / len(compiled), 4) if compiled else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=20)
    parser.add_argument("--per-lines", type=int, default=17,
                        help="one mutant per N lines of each module (at least 4 a module)")
    parser.add_argument("--module", action="append", default=[],
                        help="a module to mutate (repeatable); default: all")
    parser.add_argument("--only", action="append", default=[],
                        help="run only this mutant of the sample, MODULE:LINE:OPERATOR (repeatable)")
    parser.add_argument("--tests", action="append", default=[],
                        help="run these test ids (repeatable) instead of the covering tests: "
                             "to show that a new test kills a mutant before the map is measured again")
    parser.add_argument("--update", action="store_true",
                        help="with --only: put the new outcomes of these mutants into --out "
                             "(the full run's file), keeping their first outcome beside them")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--first", type=int, default=4,
                        help="run the N cheapest covering tests first, the rest only if it survives")
    parser.add_argument("--max-tests", type=int, default=40,
                        help="at most this many covering tests a mutant")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter that runs the tests (default: this one)")
    parser.add_argument("--rebuild-map", action="store_true",
                        help="measure the line -> tests map again even if cached")
    parser.add_argument("--map-only", action="store_true", help="measure the map and stop")
    parser.add_argument("--list", action="store_true", help="print the sample and stop")
    args = parser.parse_args(argv)
    if args.only and args.out == DEFAULT_OUT and not args.update:
        args.out = DEFAULT_OUT.with_name("mutation-rerun.json")  # the full run's result stays

    modules = args.module or product_modules()
    by_module: dict[str, list[Mutant]] = {}
    generated: dict[str, int] = {}
    for module in modules:
        source = (ROOT / module).read_text()
        everything = generate(module, source)
        generated[module] = len(everything)
        by_module[module] = sample(everything, sample_size(source, args.per_lines), args.seed, module)
    chosen = [m for module in modules for m in by_module[module]]
    if args.only:
        wanted = {tuple(o.rsplit(":", 2)) for o in args.only}
        chosen = [m for m in chosen if (m.module, str(m.line), m.operator) in wanted]
    print(f"{sum(generated.values())} mutants generated, {len(chosen)} sampled "
          f"(seed {args.seed}, one per {args.per_lines} lines, at least 4 a module)")
    if args.list:
        for m in chosen:
            print(f"{m.module}:{m.line} {m.operator}: {m.original!r} -> {m.mutated!r}")
        return 0

    # A SIGTERM still removes the private copies (the finally below).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    cpu_before = os.times()
    mapping = load_map(ROOT, args.python, args.jobs, args.out.parent, args.rebuild_map, [])
    if args.map_only:
        return 0
    workdirs = [Path(tempfile.mkdtemp(prefix=f"mutation-job{j}-")) for j in range(args.jobs)]
    for workdir in workdirs:
        copy_tree(ROOT, workdir)
    free = list(workdirs)
    outcomes: list[Outcome] = []
    started = time.monotonic()
    try:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            lock = threading.Lock()

            def one(mutant: Mutant) -> Outcome:
                with lock:
                    workdir = free.pop()
                try:
                    return run_mutant(mutant, workdir, args.python, mapping, args.first,
                                      args.max_tests, args.tests)
                finally:
                    with lock:
                        free.append(workdir)

            for done, outcome in enumerate(pool.map(one, chosen), 1):
                outcomes.append(outcome)
                print(f"[{done}/{len(chosen)}] {outcome.module}:{outcome.line} {outcome.operator} "
                      f"{outcome.outcome} {outcome.killed_by or ''} ({outcome.seconds:.1f} s)",
                      flush=True)
    finally:
        for workdir in workdirs:
            shutil.rmtree(workdir, ignore_errors=True)
    cpu_after = os.times()
    cpu = (cpu_after.children_user + cpu_after.children_system
           - cpu_before.children_user - cpu_before.children_system)
    if args.update:
        result = json.loads(args.out.read_text())
        fresh = {(o.module, o.line, o.col, o.operator, o.mutated): o for o in outcomes}
        for index, entry in enumerate(result["mutants"]):
            key = (entry["module"], entry["line"], entry["col"], entry["operator"], entry["mutated"])
            if key in fresh:
                again = asdict(fresh[key])
                again["first_outcome"] = entry.get("first_outcome", entry["outcome"])
                again["rerun_tests"] = args.tests or None
                result["mutants"][index] = again
        everything = [Outcome(**{k: v for k, v in e.items() if k in Outcome.__dataclass_fields__})
                      for e in result["mutants"]]
        all_modules = list(dict.fromkeys(e.module for e in everything))
        result.setdefault("kill_ratio_first_run", result["kill_ratio"])
        result["kill_ratio"] = ratio(everything)
        result["table"] = table(everything, all_modules)
        print(result["table"])
    else:
        report = table(outcomes, modules)
        print(report)
        compiled = [o for o in outcomes if o.outcome != "not-compiling"]
        result = {
            "seed": args.seed, "per_lines": args.per_lines, "first": args.first,
            "max_tests": args.max_tests, "map_key": mapping.get("key"),
            "generated": generated, "sampled": len(chosen),
            "not_compiling": len(outcomes) - len(compiled),
            "kill_ratio": ratio(outcomes),
            "wall_seconds": round(time.monotonic() - started, 1),
            "cpu_seconds_children": round(cpu, 1),
            "coverage_pass_seconds": round(mapping.get("seconds", 0.0), 1),
            "table": report,
            "mutants": [asdict(o) for o in outcomes],
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
