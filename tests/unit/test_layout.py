"""The layout the README's table describes: one small package of single-purpose modules."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = sorted([ROOT / "boot.py", ROOT / "update_boot_status.py",
                  *(ROOT / "entomologist").glob("*.py")])


def test_no_product_module_is_over_400_lines():
    long = {path.name: n for path in PRODUCT
            if (n := len(path.read_text().splitlines())) > 400}
    assert long == {}


def test_the_readmes_layout_table_names_every_module_of_the_package_and_no_other():
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"^\| `entomologist/(\w+\.py)` \|", readme, re.M))
    modules = {path.name for path in PRODUCT if path.parent.name == "entomologist"}
    assert named == modules - {"__init__.py"}
