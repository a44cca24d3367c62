"""Run a device script with the client's Nagle stall left in, or taken out.

    python bench/client_nagle.py --nagle boot.py --config ...         # as before the fix
    python bench/client_nagle.py --nodelay baseline_v2.py --config ... # the fix, bolted on

``--nagle`` turns entomologist.nodelay into a no-op, so boot.py runs as it
did before it set TCP_NODELAY.  ``--nodelay`` sets TCP_NODELAY, for the whole
run, on every new socket of this process to the config's endpoint, which
gives the baseline (which knows nothing of it) the same fix.
"""
from __future__ import annotations

import contextlib
import json
import runpy
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from entomologist import nodelay  # noqa: E402


def watch_forever(host: str, port: int) -> None:
    addresses = nodelay.resolve(host, port)
    seen = set(nodelay.socket_fds())
    while True:
        fresh = {i: fd for i, fd in nodelay.socket_fds().items() if i not in seen}
        if fresh:
            table = nodelay.tcp_table()
            for inode, fd in fresh.items():
                row = table.get(inode)
                if row and row[1][1] == port and row[1][0] in addresses:
                    sock = nodelay.set_on(fd, inode)
                    if sock:
                        sock.close()
                        seen.add(inode)
                elif row is not None:
                    seen.add(inode)  # a TCP socket to elsewhere
                # else: not connecting yet, or no TCP socket at all: look again
        time.sleep(nodelay.POLL_S)


def main() -> int:
    mode, script, *rest = sys.argv[1:]
    if mode == "--nagle":
        class NoWatch:
            def stop(self) -> None:
                pass

        nodelay.after_connect = lambda *a, **k: contextlib.nullcontext(NoWatch())
    elif mode == "--nodelay":
        config = Path(rest[rest.index("--config") + 1])
        device = json.loads(config.read_text())["device"]
        threading.Thread(target=watch_forever, args=(device["ENDPOINT_URL"], int(device["PORT"])),
                         daemon=True).start()
    else:
        raise SystemExit(f"unknown mode {mode}")
    sys.argv = [script, *rest]
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
