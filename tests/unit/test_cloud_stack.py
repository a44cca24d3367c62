"""cloud/: the CloudFormation an operator deploys passes cfn-lint.

One cfn-lint process lints the real stack and a copy broken on purpose, so
the test shows both that the stack is clean and that the lint can fail
(cfn-lint's import alone takes about a second: one process, not two).
"""
import subprocess
import sys
from pathlib import Path

import pytest

CLOUD = Path(__file__).resolve().parent.parent.parent / "cloud"


@pytest.mark.heavy
def test_cfn_lint_is_clean_on_cloud_and_flags_a_broken_copy(tmp_path):
    stacks = sorted(CLOUD.glob("*.yaml"))
    assert [p.name for p in stacks] == ["stack.yaml"]
    broken = tmp_path / "broken.yaml"
    broken.write_text(stacks[0].read_text().replace(
        "Type: AWS::IoT::PolicyPrincipalAttachment", "Type: AWS::IoT::PolicyAttachment"))
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from cfnlint.runner import main; sys.exit(main())",
         "--format", "parseable", *map(str, stacks), str(broken)],
        capture_output=True, text=True, timeout=120)
    findings = [line for line in run.stdout.splitlines() if line.strip()]
    assert [f for f in findings if not f.startswith(str(broken))] == [], run.stdout + run.stderr
    assert any("PolicyAttachment" in f for f in findings), run.stdout + run.stderr
