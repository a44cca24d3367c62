"""bench/mutation.py: the mutants it makes from a source, and the sample it draws."""
import ast
import os
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_mutation", ROOT / "bench" / "mutation.py")
mutation = importlib.util.module_from_spec(spec)
sys.modules["bench_mutation"] = mutation  # its dataclasses look their module up
spec.loader.exec_module(mutation)

SOURCE = '''\
"""A module docstring with == and 3 in it."""
from typing import TYPE_CHECKING
import logging

__all__ = ["f"]
log = logging.getLogger(__name__)
if TYPE_CHECKING:
    LIMIT = 7


def f(x: int = 2, flag: bool = True) -> int:  # a comment that stays
    """Docstring: x < 3 and not y."""
    log.debug("x is %s", x)
    total = x  +  1   # odd spacing stays
    total += 3
    if x == 0 and not flag:
        raise ValueError("é ü: non-ASCII before " + str(x))
    print(f"{x:08d}", "é", x >= 4)
    return total


if __name__ == "__main__":
    f(1 + 1)
'''


def EVERY(test):
    return True  # the made-up test ids of these maps "exist"


def mutants_of(source=SOURCE):
    return mutation.generate("m.py", source)


def test_every_mutant_replaces_exactly_its_node_and_keeps_the_rest_of_the_file():
    for mutant in mutants_of():
        mutated = mutation.apply(SOURCE, mutant)
        lines = SOURCE.splitlines(keepends=True)
        before = "".join(lines[:mutant.line - 1])
        after = "".join(lines[mutant.end_line:])
        assert mutated.startswith(before) and mutated.endswith(after), mutant
        assert mutant.mutated in mutated
        # Putting the original back gives the file again, byte for byte.
        assert mutated.replace(mutant.mutated, mutant.original, 1) == SOURCE or \
            mutated.count(mutant.mutated) > 1
        assert mutation.compiles(mutated, "m.py"), mutant


def test_a_node_after_non_ascii_text_on_its_line_is_found_by_characters_not_bytes():
    (plus,) = [m for m in mutants_of() if m.operator == "arithmetic" and m.line == 17]
    assert plus.original == '"é ü: non-ASCII before " + str(x)'
    line = mutation.apply(SOURCE, plus).splitlines()[16]
    assert line == """        raise ValueError('é ü: non-ASCII before ' - str(x))"""


def test_the_operators_the_spec_names_are_made():
    made = {(m.line, m.operator, m.original, m.mutated) for m in mutants_of()}
    assert (14, "arithmetic", "x  +  1", "x - 1") in made
    assert (14, "int+1", "1", "2") in made
    assert (15, "delete-statement", "total += 3", "pass") in made
    assert (16, "negate-if", "x == 0 and not flag", "not (x == 0 and not flag)") in made
    assert (16, "and-or", "x == 0 and not flag", "x == 0 or not flag") in made
    assert (16, "compare", "x == 0", "x != 0") in made
    assert (16, "int+1", "0", "1") in made
    assert (16, "remove-not", "not flag", "(flag)") in made
    assert (18, "compare", "x >= 4", "x > 4") in made
    assert (19, "return-none", "total", "None") in made
    assert (11, "true-false", "True", "False") in made
    assert (11, "int+1", "2", "3") in made  # a default value is code


def test_docstrings_annotations_debug_logs_all_type_checking_and_main_are_not_mutated():
    lines = {m.line for m in mutants_of()}
    assert not lines & {1, 5, 7, 8, 12, 13, 22, 23}
    # The annotations of line 11 (int, bool, -> int) make no mutant; its defaults do.
    assert {m.original for m in mutants_of() if m.line == 11} == {"2", "True"}
    # A format spec inside an f-string is text, not an integer to mutate.
    assert [m.original for m in mutants_of() if m.line == 18 and m.operator == "int+1"] == ["4"]


def test_a_mutant_that_does_not_compile_is_recognised():
    source = "def g():\n    return 1\n"
    (ret,) = [m for m in mutants_of(source) if m.operator == "return-none"]
    assert mutation.compiles(mutation.apply(source, ret), "g.py")
    assert not mutation.compiles("def g(:\n", "g.py")


def test_the_sample_is_the_same_for_a_seed_and_another_for_another_seed():
    everything = mutants_of()
    one = mutation.sample(everything, 5, seed=20, module="m.py")
    assert one == mutation.sample(mutants_of(), 5, seed=20, module="m.py")
    assert one != mutation.sample(everything, 5, seed=21, module="m.py")
    assert len(set(one)) == 5 and set(one) <= set(everything)


def test_a_module_gets_one_mutant_per_n_lines_and_never_fewer_than_four():
    assert mutation.sample_size("x = 1\n" * 170, 17) == 10
    assert mutation.sample_size("x = 1\n" * 10, 17) == 4


def test_tests_covering_a_line_run_unit_tests_first_then_the_fastest():
    mapping = {"tests": {"tests/integration/test_a.py::t": 0.5, "tests/unit/test_b.py::slow": 2.0,
                         "tests/unit/test_b.py::fast": 0.01},
               "lines": {"m.py": {"16": ["tests/integration/test_a.py::t",
                                         "tests/unit/test_b.py::slow"],
                                  "17": ["tests/unit/test_b.py::fast"]}}}
    (raise_,) = [m for m in mutants_of() if m.line == 17 and m.operator == "delete-statement"]
    assert mutation.covering_tests(mapping, raise_, EVERY) == ["tests/unit/test_b.py::fast"]
    (negated,) = [m for m in mutants_of() if m.operator == "negate-if"]
    assert mutation.covering_tests(mapping, negated, EVERY) == [
        "tests/unit/test_b.py::slow", "tests/integration/test_a.py::t"]
    assert ast.parse(mutation.apply(SOURCE, negated))


def test_a_deleted_assignment_runs_first_the_tests_that_read_what_it_assigned():
    (total,) = [m for m in mutants_of() if m.line == 14 and m.operator == "delete-statement"]
    assert total.func_level and set(total.uses) == {15, 19}
    mapping = {"tests": {"tests/unit/t.py::reads": 5.0, "tests/unit/t.py::not_reading": 0.1},
               "lines": {"m.py": {"14": ["tests/unit/t.py::reads", "tests/unit/t.py::not_reading"],
                                  "19": ["tests/unit/t.py::reads"]}}}
    assert mutation.covering_tests(mapping, total, EVERY) == ["tests/unit/t.py::reads",
                                                       "tests/unit/t.py::not_reading"]


def test_a_module_constant_runs_the_tests_of_its_readers_not_every_importer():
    source = "LIMIT = 3\n\n\ndef f(x):\n    return x > LIMIT\n"
    (deleted,) = [m for m in mutants_of(source) if m.operator == "delete-statement"]
    assert not deleted.func_level and deleted.uses == (5,)
    mapping = {"tests": {}, "lines": {"m.py": {"1": ["tests/unit/t.py::a", "tests/unit/t.py::b"],
                                               "5": ["tests/unit/t.py::b"]}}}
    assert mutation.covering_tests(mapping, deleted, EVERY) == ["tests/unit/t.py::b"]


def test_a_test_renamed_since_the_map_was_measured_is_left_out(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text("def test_new_name():\n    pass\n")
    assert mutation.still_exists("tests/test_a.py::test_new_name", tmp_path)
    assert mutation.still_exists("tests/test_a.py::test_new_name[param-1]", tmp_path)
    assert not mutation.still_exists("tests/test_a.py::test_old_name", tmp_path)
    assert not mutation.still_exists("tests/test_gone.py::test_new_name", tmp_path)


def test_a_mutant_of_the_same_size_and_second_as_the_original_is_run_not_its_cached_bytecode(
        tmp_path, monkeypatch):
    # A .pyc is trusted on the source's size and mtime in whole seconds: `<` and `>`
    # written within one second would be read back from the other's bytecode.
    monkeypatch.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
    (tmp_path / "m.py").write_text("SMALLER = 1 < 2\n")
    (tmp_path / "test_m.py").write_text("import m\n\ndef test_m():\n    assert m.SMALLER\n")
    stamp = (tmp_path / "m.py").stat().st_mtime_ns
    assert mutation.run_tests(tmp_path, sys.executable, ["test_m.py"], 60)[0] == "survived"
    (tmp_path / "m.py").write_text("SMALLER = 1 > 2\n")
    os.utime(tmp_path / "m.py", ns=(stamp, stamp))
    assert mutation.run_tests(tmp_path, sys.executable, ["test_m.py"], 60)[0] == "killed"


def test_an_interpreter_named_relative_to_the_current_folder_runs_the_mutants_tests(
        tmp_path, monkeypatch):
    # `make mutation` names it `.venv/bin/python`; the tests run in each mutant's copy.
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "test_m.py").write_text("def test_m():\n    pass\n")
    monkeypatch.chdir(ROOT)
    relative = os.path.relpath(sys.executable)
    assert not os.path.isabs(relative)
    assert mutation.run_tests(tmp_path / "copy", relative, ["test_m.py"], 60)[0] == "survived"
