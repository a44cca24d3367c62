"""systemd-analyze on the unit as installed, for the tests of its drop-ins."""
import re
import subprocess


def exposure(args) -> tuple[str, float]:
    """``systemd-analyze security``'s report and overall exposure level for ``args``."""
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=25",
                           "--no-pager", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, float(re.search(r"Overall exposure level for \S+: (\d+\.\d)",
                                        proc.stdout).group(1))
