"""A real ``redis-server`` for the --broker tests: a throwaway one on a free port of
127.0.0.1, started as the test's child and ended by its pid.

``scripts/install-test-tools`` installs redis-server when it is missing (the README's test
command runs it first); a test never skips for want of it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
from pathlib import Path

from .harness import end, free_port, wait_for


class RedisServer:
    """``redis-server`` in ``directory``: without persistence (a restart loses every topic,
    as a cache's would), or with an append-only file written at each command
    (``persistent``: a kill -9 loses nothing acknowledged)."""

    def __init__(
        self,
        directory: Path,
        *,
        persistent: bool = False,
        password: str | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        assert os.path.exists(binary), "redis-server missing: run scripts/install-test-tools"
        self.directory = directory
        self.port = free_port()
        self.tls = tls  # (certificate, key, CA): TLS only (rediss://), no client certificate
        port = ["--port", str(self.port)]
        if tls is not None:
            cert, key, ca = tls
            port = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(cert)]
            port += ["--tls-key-file", str(key), "--tls-ca-cert-file", str(ca)]
            port += ["--tls-auth-clients", "no"]
        self.args = [binary, *port, "--bind", "127.0.0.1", "--save", ""]
        self.args += ["--dir", str(directory), "--daemonize", "no", "--loglevel", "warning"]
        if persistent:
            self.args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            self.args += ["--appendonly", "no"]
        if password is not None:
            self.args += ["--requirepass", password]
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.tls[2]}"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 (the child's, kept)
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_for(self.answers, 10, f"redis-server on port {self.port}")

    def answers(self) -> bool:
        """PING answered (NOAUTH counts: it is up)."""
        try:
            with self._connect(timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))
        except OSError:
            return False

    def _connect(self, timeout: float) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        if self.tls is None:
            return sock
        context = ssl.create_default_context(cafile=str(self.tls[2]))
        return context.wrap_socket(sock, server_hostname="127.0.0.1")

    def command(self, *args: str) -> bytes:
        """One command (inline), its raw answer."""
        with self._connect(timeout=5) as s:
            if self.password is not None:
                s.sendall(f"AUTH {self.password}\r\n".encode())
                assert s.recv(64).startswith(b"+OK")
            s.sendall((" ".join(args) + "\r\n").encode())
            return s.recv(65536)

    def kill(self) -> None:
        """kill -9: no shutdown, nothing saved but what the append-only file has."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            end(self.proc.pid)
            self.proc.wait(10)
            self.proc = None
