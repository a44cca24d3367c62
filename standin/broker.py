"""Debian's mosquitto as the stand-in's broker: mutual TLS on a loopback port."""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or shutil.which(
        "mosquitto", path="/usr/sbin:/usr/local/sbin:/sbin")


def find_dynsec_plugin() -> str | None:
    found = sorted(glob.glob("/usr/lib/*/mosquitto_dynamic_security.so")
                   + glob.glob("/usr/lib/mosquitto_dynamic_security.so"))
    return found[0] if found else None


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now: a process that binds it later may find it taken (an outgoing
    connection's local port comes from the same range), so callers bind at once, or
    use ``reserved_port``, or try another."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def reserved_port(host: str) -> socket.socket:
    """A socket bound to a free port and kept: nothing else can take the port
    before its listener needs it. Without SO_REUSEADDR, which would let another
    socket that sets it (mosquitto's) bind the port too and listen first."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.bind((host, 0))
    return s


class Broker:
    """``dynsec_file``: enforce the rules in it through mosquitto's
    dynamic-security plugin, and log what standin.enforce reads (every
    connect, subscribe and denied publish; the debug level is the only one that
    has the last)."""

    def __init__(self, directory: Path, ca: Path, cert: Path, key: Path,
                 host: str = "127.0.0.1", port: int = 0, tcp_nodelay: bool = True,
                 dynsec_file: Path | None = None):
        self.directory = directory
        self.host = host
        self.port = port or free_port(host)
        self.dynsec_file = dynsec_file
        self.conf = directory / "mosquitto.conf"
        self.log_path = directory / "mosquitto.log"
        lines = [
            "per_listener_settings false",
            "persistence false",
            "log_dest stderr",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            f"listener {self.port} {host}",
            f"cafile {ca}",
            f"certfile {cert}",
            f"keyfile {key}",
            "require_certificate true",
            "use_identity_as_username true",
        ]
        if dynsec_file is not None:
            plugin = find_dynsec_plugin()
            if plugin is None:
                raise RuntimeError("mosquitto's dynamic-security plugin is missing "
                                   "(mosquitto_dynamic_security.so, in Debian's mosquitto)")
            lines += ["log_type subscribe", "log_type debug", f"plugin {plugin}",
                      f"plugin_opt_config_file {dynsec_file}"]
        if tcp_nodelay:
            # AWS IoT is no stock mosquitto: without this the broker's own small
            # writes wait for the device's delayed ACKs (bench/delay_line.py).
            lines.append("set_tcp_nodelay true")
        if os.geteuid() == 0:
            # mosquitto drops root for user "mosquitto", which cannot read 0600 keys.
            lines.append("user root")
        self._lines = lines
        self._write_conf()
        self._process: subprocess.Popen | None = None
        self._log = None

    def _write_conf(self) -> None:
        self.conf.write_text("".join(
            (f"listener {self.port} {self.host}" if line.startswith("listener ") else line)
            + "\n" for line in self._lines))

    def start(self, limit: float = 5.0, attempts: int = 3) -> None:
        """Start mosquitto; on a port taken since it was chosen, again on another
        (``port`` then changes)."""
        for attempt in range(attempts):
            logged = self.log_path.stat().st_size if self.log_path.exists() else 0
            try:
                return self._start(limit)
            except RuntimeError:
                with open(self.log_path, "rb") as f:
                    f.seek(logged)
                    taken = b"Address already in use" in f.read()
                if not taken or attempt == attempts - 1:
                    raise
                self.port = free_port(self.host)
                self._write_conf()

    def _start(self, limit: float) -> None:
        mosquitto = find_mosquitto()
        if not mosquitto:
            raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
        if self._log is None:
            self._log = open(self.log_path, "ab")
        logged = self.log_path.stat().st_size
        self._process = subprocess.Popen([mosquitto, "-c", str(self.conf)], stdout=self._log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        end = time.monotonic() + limit
        while time.monotonic() < end:
            if self._process.poll() is not None:
                raise RuntimeError(f"mosquitto exited; see {self.log_path}")
            # Its own word that its listener is open: a connection alone could reach
            # whatever took the port first.
            with open(self.log_path, "rb") as f:
                f.seek(logged)
                running = b" running" in f.read()
            try:
                if running:
                    socket.create_connection((self.host, self.port), timeout=0.2).close()
                    return
            except OSError:
                pass
            time.sleep(0.005)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.port}")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        if self._process is not None:
            # Killed, not asked: it keeps nothing (persistence false), and on SIGTERM
            # its loop takes 100 ms to notice, paid by every test's stand-in.
            self._process.kill()
            self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None
