"""The image test's pure helpers: which mirror it debootstraps from, which files it copies."""
import importlib.util
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("imagetest", ROOT / "image" / "imagetest.py")
imagetest = importlib.util.module_from_spec(spec)
spec.loader.exec_module(imagetest)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_mirror_is_the_bookworm_main_entry_of_a_deb822_sources_file(tmp_path):
    write(tmp_path / "sources.list.d/debian.sources",
          "Types: deb\nURIs: http://security.example/debian-security\n"
          "Suites: bookworm-security\nComponents: main\n\n"
          "Types: deb\n# a comment\nURIs: http://mirror.example/debian\n"
          "Suites: bookworm bookworm-updates\nComponents: main contrib\n"
          "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n")
    assert imagetest.apt_mirror(tmp_path) == "http://mirror.example/debian"


def test_mirror_from_a_one_line_sources_list_skips_other_suites_and_deb_src(tmp_path):
    write(tmp_path / "sources.list",
          "deb-src http://src.example/debian bookworm main\n"
          "deb http://old.example/debian bullseye main\n"
          "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main # here\n")
    assert imagetest.apt_mirror(tmp_path) == "http://mirror.example/debian"


def test_mirror_falls_back_to_debians_cdn_when_apt_names_none(tmp_path):
    write(tmp_path / "sources.list.d/node.sources",
          "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\n"
          "Components: main\n")
    assert imagetest.apt_mirror(tmp_path) == "http://deb.debian.org/debian"


def test_project_files_follow_the_tree_not_a_list_new_packages_included(tmp_path):
    write(tmp_path / ".gitignore", ".venv/\n__pycache__/\n")
    write(tmp_path / "boot.py", "")
    write(tmp_path / "entomologist/__init__.py", "")
    write(tmp_path / "entomologist/__pycache__/x.pyc", "")
    write(tmp_path / ".venv/bin/python", "")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "add", "boot.py", ".gitignore"], check=True)
    (tmp_path / "removed.py").write_text("")
    subprocess.run(["git", "-C", str(tmp_path), "add", "removed.py"], check=True)
    (tmp_path / "removed.py").unlink()
    assert sorted(imagetest.project_files(tmp_path)) == [
        ".gitignore", "boot.py", "entomologist/__init__.py"]
