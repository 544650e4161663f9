"""TLS (--certfile/--keyfile) with certificates that trustme makes for each test: none is
committed. Real processes, real TLS clients on 127.0.0.1."""

from __future__ import annotations

import contextlib
import http.client
import re
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from websockets.sync.client import connect

from .support.harness import wait_for
from .support.helpers import Master, run_wsfleet
from .support.loadtest import Load


@dataclass
class Certs:
    ca: trustme.CA
    certfile: Path
    keyfile: Path
    client: ssl.SSLContext

    def issue(self) -> None:
        """A new certificate from the same CA in the same files, as a rotation does."""
        cert = self.ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_pem.write_to_path(str(self.keyfile))
        self.certfile.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    ca = trustme.CA()
    client = ssl.create_default_context()
    ca.configure_trust(client)
    made = Certs(ca, tmp_path / "cert.pem", tmp_path / "key.pem", client)
    made.issue()
    return made


def served_certificate(port: int, client: ssl.SSLContext) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        client.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def test_a_worker_serves_wss_and_its_health_path_over_tls(spawn, certs: Certs) -> None:
    proc = spawn(
        "worker", "--port", "0", "--certfile", str(certs.certfile), "--keyfile", str(certs.keyfile)
    )
    port = proc.wait_ready()
    proc.wait_line(rf"listening on wss://127.0.0.1:{port}")
    proc.wait_line("loop=asyncio")  # --loop auto: asyncio's TLS measured faster than uvloop's
    try:
        with connect(f"wss://127.0.0.1:{port}/", ssl=certs.client) as ws:
            ws.send("secret")
            assert ws.recv(timeout=5) == "secret"
    except TimeoutError as exc:  # (seen once in CI, not reproduced: say what the worker said)
        raise AssertionError(f"{exc}; the worker's output:\n{proc.output}") from exc
    health = http.client.HTTPSConnection("127.0.0.1", port, context=certs.client, timeout=10)
    try:
        health.request("GET", "/health/")
        assert health.getresponse().status == 200
    finally:
        health.close()


def test_a_reload_serves_rotated_certificates(spawn, tmp_path: Path, certs: Certs) -> None:
    master = Master(
        spawn,
        tmp_path,
        "-w",
        "2",
        "--certfile",
        str(certs.certfile),
        "--keyfile",
        str(certs.keyfile),
    )
    assert master.status()["master"]["addresses"][0].startswith("wss://")
    before = served_certificate(master.port, certs.client)
    certs.issue()
    result = run_wsfleet(["reload", "--wait", "--pidfile", master.pidfile], timeout=60)
    assert result.returncode == 0, result.stderr
    master.wait_workers(2)
    assert served_certificate(master.port, certs.client) != before
    with connect(f"wss://127.0.0.1:{master.port}/", ssl=certs.client) as ws:
        ws.send("rotated")
        assert ws.recv(timeout=5) == "rotated"


def test_a_reload_that_turns_tls_on_shows_wss_in_the_status(
    spawn, tmp_path: Path, certs: Certs
) -> None:
    """The configuration in force is the one the reload read: the status's addresses (and
    the new workers) say wss:// once the configuration file adds --certfile."""
    conf = tmp_path / "wsfleet.toml"
    conf.write_text("workers = 1\n")
    master = Master(spawn, tmp_path, "--config", str(conf))
    assert master.status()["master"]["addresses"] == [f"ws://127.0.0.1:{master.port}"]
    conf.write_text(f"workers = 1\ncertfile = '{certs.certfile}'\nkeyfile = '{certs.keyfile}'\n")
    result = run_wsfleet(["reload", "--wait", "--pidfile", master.pidfile], timeout=60)
    assert result.returncode == 0, result.stderr
    assert master.status()["master"]["addresses"] == [f"wss://127.0.0.1:{master.port}"]
    with connect(f"wss://127.0.0.1:{master.port}/", ssl=certs.client) as ws:
        ws.send("now over TLS")
        assert ws.recv(timeout=5) == "now over TLS"


def test_a_reload_with_broken_certificate_files_keeps_serving_the_old_ones(
    spawn, tmp_path: Path, certs: Certs
) -> None:
    master = Master(
        spawn,
        tmp_path,
        "-w",
        "1",
        "--certfile",
        str(certs.certfile),
        "--keyfile",
        str(certs.keyfile),
    )
    before = served_certificate(master.port, certs.client)
    certs.keyfile.write_text("not a key\n")
    result = run_wsfleet(["reload", "--wait", "--pidfile", master.pidfile], timeout=60)
    assert result.returncode == 1
    assert f"done with the old configuration: --keyfile {certs.keyfile}: no private key" in (
        result.stderr
    )
    assert served_certificate(master.port, certs.client) == before


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("missing", "--certfile {dir}/nope.pem: No such file or directory"),
        ("mismatched", "--keyfile {dir}/other.pem: the key is not the certificate's"),
        ("key only", "--keyfile {dir}/key.pem needs --certfile"),
        ("no key", "--certfile {dir}/cert.pem holds no private key: give it with --keyfile FILE"),
        ("key as certificate", "--certfile {dir}/key.pem: no certificate in it"),
        ("certificate as key", "--keyfile {dir}/cert.pem: no private key in it"),
        ("encrypted key", "--keyfile {dir}/locked.pem: the private key is encrypted"),
    ],
)
def test_bad_certificate_files_are_exit_2_naming_them(
    tmp_path: Path, certs: Certs, which: str, message: str
) -> None:
    """Each names the option to fix, not OpenSSL's "PEM lib"; none waits for a passphrase."""
    cert, key = str(certs.certfile), str(certs.keyfile)
    if which == "missing":
        args = ["--certfile", str(tmp_path / "nope.pem"), "--keyfile", key]
    elif which == "mismatched":
        other = certs.ca.issue_cert("127.0.0.1")
        other.private_key_pem.write_to_path(str(tmp_path / "other.pem"))
        args = ["--certfile", cert, "--keyfile", str(tmp_path / "other.pem")]
    elif which == "key only":
        args = ["--keyfile", key]
    elif which == "no key":
        args = ["--certfile", cert]
    elif which == "key as certificate":
        args = ["--certfile", key]
    elif which == "certificate as key":
        args = ["--certfile", cert, "--keyfile", cert]
    else:
        private = serialization.load_pem_private_key(certs.keyfile.read_bytes(), None)
        locked = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        (tmp_path / "locked.pem").write_bytes(locked)
        args = ["--certfile", cert, "--keyfile", str(tmp_path / "locked.pem")]
    for command in ("worker", "start"):
        result = run_wsfleet([command, "--port", "0", *args])
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().count("\n") == 0
        assert message.format(dir=tmp_path) in result.stderr


def test_a_certificate_file_that_holds_its_key_needs_no_keyfile(spawn, certs: Certs) -> None:
    certs.certfile.write_bytes(certs.keyfile.read_bytes() + certs.certfile.read_bytes())
    port = spawn("worker", "--port", "0", "--certfile", str(certs.certfile)).wait_ready()
    with connect(f"wss://127.0.0.1:{port}/", ssl=certs.client) as ws:
        ws.send("secret")
        assert ws.recv(timeout=5) == "secret"


def refused_handshake(port: int) -> None:
    """One TLS handshake that the worker's end fails: plain HTTP to the TLS port; returns
    once the worker has closed the connection (so it has counted the failure)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(4096):
                pass


def test_failed_handshakes_are_logged_without_a_flood(spawn, certs: Certs, loop: str) -> None:
    tls = ["--certfile", str(certs.certfile), "--keyfile", str(certs.keyfile), "--loop", loop]
    proc = spawn("worker", "--port", "0", *tls)
    port = proc.wait_ready()
    # A client that does not trust the certificate: the reason its alert gives, and who.
    untrusting = ssl.create_default_context()  # the system's CAs: not the test's own
    began = time.monotonic()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError),
    ):
        untrusting.wrap_socket(raw, server_hostname="127.0.0.1")
    # asyncio's SSL protocol names the client; uvloop's compiled one hides it.
    who = "127.0.0.1" if loop == "asyncio" else "an unknown address"
    first = proc.wait_line(r"\[WARNING\] wsfleet\.worker: TLS handshake from (.*) failed: (.*)")
    # The first report was made between began and now (not only once the client had its
    # error: the worker reads the client's alert after, later on a busy machine).
    seen = time.monotonic()
    assert first.groups() == (who, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")
    # A scanner: one line every few seconds at most, with the count since the last one.
    reported = re.compile(r"TLS handshake from .* failed: (.*) \((\d+) failed handshakes since")
    spans: list[tuple[float, float]] = []  # when each failed handshake began and ended
    while not any(reported.search(line) for line in proc.lines):
        assert time.monotonic() < began + 30, proc.output
        start = time.monotonic()
        refused_handshake(port)
        spans.append((start, time.monotonic()))
    lines = [line for line in proc.lines if "TLS handshake from" in line]
    assert len(lines) == 2, proc.output
    match = reported.search(lines[1])
    assert match is not None and match.group(1) == "[SSL: HTTP_REQUEST] http request"
    # It counts every failure up to the first one 5 s or more after the first report (a
    # few more may have come before the test saw the line: they wait for the next report).
    count = int(match.group(2))
    assert 10 <= count <= len(spans)
    assert spans[count - 1][1] >= began + 5
    assert spans[count - 2][0] < seen + 5
    # The worker serves as before.
    with connect(f"wss://127.0.0.1:{port}/", ssl=certs.client) as ws:
        ws.send("still here")
        assert ws.recv(timeout=5) == "still here"


def test_tls_on_uvloop_when_asked_for(spawn, certs: Certs) -> None:
    tls = ["--certfile", str(certs.certfile), "--keyfile", str(certs.keyfile)]
    proc = spawn("worker", "--port", "0", "--loop", "uvloop", *tls)
    port = proc.wait_ready()
    proc.wait_line("loop=uvloop")
    with connect(f"wss://127.0.0.1:{port}/", ssl=certs.client) as ws:
        ws.send("fast?")
        assert ws.recv(timeout=5) == "fast?"


def test_rotating_certificates_under_load_fails_nothing(spawn, tmp_path: Path, certs: Certs):
    """Rotating the files and reloading serves the new certificate without a failed
    connection attempt (200 new connections/s and 100 long-lived, over wss://)."""
    tls = ["--certfile", str(certs.certfile), "--keyfile", str(certs.keyfile)]
    master = Master(spawn, tmp_path, "-w", "2", *tls)
    url = f"wss://127.0.0.1:{master.port}/"
    before = served_certificate(master.port, certs.client)
    load = Load(url, rate=200, long_lived=100, duration=60, ssl=certs.client).start()
    try:
        certs.issue()
        result = run_wsfleet(["reload", "--wait", "--pidfile", master.pidfile], timeout=60)
        assert result.returncode == 0, result.stderr
        master.wait_workers(2, timeout=30)  # the old workers have drained
        wait_for(
            lambda: load.results.close_codes.get("closed 1012", 0) >= 100,
            what="every long-lived connection to be closed with 1012 by the reload",
        )
    finally:
        results = load.stop()
    summary = results.summary()
    assert results.failures() == [], summary
    assert summary["attempts"] >= 100, summary  # the load really ran
    assert set(results.close_codes) == {"closed 1012"}, summary  # the long-lived ones, once
    assert results.close_codes["closed 1012"] >= 100, summary
    assert served_certificate(master.port, certs.client) != before
