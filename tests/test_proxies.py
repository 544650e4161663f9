"""wsfleet behind the real nginx and the real HAProxy (installed by scripts/install-test-tools),
each run from the project's own example configuration (conf/nginx.conf, conf/haproxy.cfg) with
its ports and runtime files moved to the test's directory.

The client connects from 127.0.0.2 (any 127/8 address is loopback), so that the address wsfleet
reports is told apart from the proxy's own, 127.0.0.1."""

from __future__ import annotations

import contextlib
import pwd
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
from websockets.sync.client import connect

from .support.harness import ROOT, free_port, wait_for
from .support.helpers import CLIENT_APP, app_master

CLIENT = "127.0.0.2"


def binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    assert found, f"{name} is missing: scripts/install-test-tools installs it"
    return found


@contextlib.contextmanager
def running(args: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    """A proxy in the foreground, until it listens on port; ended with its children, by pid."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _listens(port) or proc.poll() is not None, what=f"{args[0]} to listen")
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        yield proc
    finally:
        children = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        proc.kill()
        proc.wait(10)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(children, timeout=10)


def _listens(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def ask_through(port: int) -> str:
    """Connect from CLIENT through the proxy on port; what wsfleet.client_address says."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(CLIENT, 0))
    with connect(f"ws://127.0.0.1:{port}/", sock=sock) as ws:
        ws.send("who?")
        answer = ws.recv(timeout=10)
    assert isinstance(answer, str)
    return answer


def test_behind_nginx_on_a_unix_socket_the_client_address_comes_from_x_forwarded_for(
    spawn, tmp_path, socket_dir
) -> None:
    """nginx's workers (nobody, in group nogroup) reach the socket through its group: wsfleet
    makes it 0660 (--umask) and gives it the workers' group (--group)."""
    path = socket_dir / "ws.sock"
    master = app_master(
        spawn, tmp_path, CLIENT_APP, "-w", "2", "--bind", "127.0.0.1:0", "--bind",
        f"unix:{path}", "--group", "nogroup",
    )  # fmt: skip
    port = free_port()
    conf = (ROOT / "conf" / "nginx.conf").read_text()
    for old, new in (
        ("unix:/run/wsfleet/wsfleet.sock", f"unix:{path}"),
        ("127.0.0.1:8080", f"127.0.0.1:{port}"),
        ("user www-data;", "user nobody nogroup;"),
        ("/run/", f"{tmp_path}/"),
        ("/var/log/nginx/", f"{tmp_path}/"),
        ("/var/lib/nginx/", f"{tmp_path}/"),
        ("worker_processes auto;", "worker_processes 1;"),
    ):
        assert old in conf, old
        conf = conf.replace(old, new)
    (tmp_path / "nginx.conf").write_text(conf)
    nginx = [binary("nginx"), "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;"]
    with running(nginx, port) as proc:
        workers = psutil.Process(proc.pid).children()
        assert [w.uids().real for w in workers] == [pwd.getpwnam("nobody").pw_uid]
        for _ in range(4):  # over both workers
            assert ask_through(port) == CLIENT
        assert ask_through(master.port) == CLIENT  # directly: the peer itself
    assert "error" not in Path(tmp_path / "wsfleet-error.log").read_text().lower()


def test_behind_haproxy_the_client_address_comes_from_the_proxy_protocol(spawn, tmp_path) -> None:
    master = app_master(spawn, tmp_path, CLIENT_APP, "-w", "2", "--proxy-protocol")
    port = free_port()
    conf = (ROOT / "conf" / "haproxy.cfg").read_text()
    for old, new in (
        ("127.0.0.1:8765", f"127.0.0.1:{master.port}"),
        ("127.0.0.1:8081", f"127.0.0.1:{port}"),
    ):
        assert old in conf, old
        conf = conf.replace(old, new)
    (tmp_path / "haproxy.cfg").write_text(conf)
    with running([binary("haproxy"), "-f", str(tmp_path / "haproxy.cfg"), "-db"], port):
        for _ in range(4):  # over both workers
            assert ask_through(port) == CLIENT
