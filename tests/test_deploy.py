"""The deployment files: the real supervisord and supervisorctl running copies of
conf/supervisord*.conf, scripts/rolling-restart, the systemd units (the service's
notifications, the socket unit under systemd-socket-activate), and the Kubernetes manifest's
agreement with wsfleet's defaults."""

from __future__ import annotations

import configparser
import contextlib
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from wsfleet import config as cfg
from wsfleet import control

from .support.harness import ROOT, Supervisor, free_port, gone, wait_for
from .support.helpers import Master, echo_once, write_app
from .support.loadtest import Load


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    sv = Supervisor(tmp_path, "supervisord.conf")
    try:
        sv.wait_running()
        yield sv
    finally:
        sv.cleanup()


@pytest.fixture
def fcgi_supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    sv = Supervisor(tmp_path, "supervisord-fcgi.conf")
    try:
        sv.wait_running()
        yield sv
    finally:
        sv.cleanup()


def test_supervisord_runs_four_workers_on_one_port(supervisor: Supervisor) -> None:
    states = supervisor.status()
    assert sorted(states) == [f"wsfleet:wsfleet_0{i}" for i in range(4)]
    assert echo_once(supervisor.url) == "hi"
    for pid in supervisor.pids():
        title = Path(f"/proc/{pid}/cmdline").read_bytes()
        assert title.startswith(f"wsfleet: worker [127.0.0.1:{supervisor.port}]".encode())
    # Runtime files live next to the configuration.
    here = Path(supervisor.conf).parent
    assert (here / "supervisor.sock").exists() and (here / "wsfleet_00.log").exists()


def test_stop_all_closes_connections_with_1001(supervisor: Supervisor) -> None:
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(connect(supervisor.url)) for _ in range(8)]
        for ws in clients:
            ws.send("x")
            ws.recv(timeout=5)
        result = supervisor.ctl("stop", "all")
        assert result.returncode == 0, result.stdout
        for ws in clients:
            with pytest.raises(ConnectionClosed) as info:
                ws.recv(timeout=10)
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert all(state == "STOPPED" for state, _ in supervisor.status().values())
    log = (Path(supervisor.conf).parent / "supervisord.log").read_text()
    assert log.count("(exit status 0)") == 4  # every worker drained and exited cleanly


def test_restart_all(supervisor: Supervisor) -> None:
    before = supervisor.pids()
    result = supervisor.ctl("restart", "all")
    assert result.returncode == 0, result.stdout
    supervisor.wait_running()
    assert not supervisor.pids() & before
    assert echo_once(supervisor.url) == "hi"


def assert_one_at_a_time(sv: Supervisor) -> None:
    """supervisord's log: each process ends (it exits after its restart's SIGHUP; `stopped`
    after a stop) and is back to RUNNING before the next one ends."""
    log = (Path(sv.conf).parent / "supervisord.log").read_text()
    events = [
        ("success" if kind == "success" else "ended", name)
        for kind, name in re.findall(r"(stopped|exited|success): (wsfleet_\d\d)", log)
    ]
    events = events[events.index(("ended", "wsfleet_00")) :]
    assert events == [(kind, f"wsfleet_0{i}") for i in range(4) for kind in ("ended", "success")], (
        events
    )


def test_rolling_restart_script_replaces_every_pid_one_at_a_time(supervisor: Supervisor) -> None:
    before = supervisor.pids()
    began = time.monotonic()
    result = supervisor.rolling_restart(timeout=120)
    took = time.monotonic() - began
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(re.findall(r"wsfleet:wsfleet_0\d: pid \d+ -> \d+", result.stdout)) == 4
    assert not supervisor.pids() & before
    assert_one_at_a_time(supervisor)
    # No client, so no drain to wait for: each step is supervisord's startsecs (1 s) and
    # little else; no wait of its own in seconds (it was about 1.5 s a step through
    # supervisorctl restart and status; about 1.1 s now).
    assert took < 4 * (1 + 1.0), (took, result.stdout)


def test_rolling_restart_closes_each_client_with_1012_and_fails_no_attempt(
    supervisor: Supervisor,
) -> None:
    """`wsfleet rolling-restart` tells each client 1012 (service restart), as the master's
    reload does (`supervisorctl stop` tells 1001: test_stop_all_closes_connections_with_1001),
    replaces every process, and no connection attempt made meanwhile fails."""
    before = supervisor.pids()
    load = Load(supervisor.url, rate=20, long_lived=0, duration=120).start()
    try:
        with contextlib.ExitStack() as stack:
            clients = [stack.enter_context(connect(supervisor.url)) for _ in range(4)]
            for ws in clients:
                ws.send("x")
                assert ws.recv(timeout=5) == "x"
            result = supervisor.rolling_restart(timeout=120)
            assert result.returncode == 0, result.stdout + result.stderr
            for ws in clients:
                with pytest.raises(ConnectionClosed) as info:
                    ws.recv(timeout=10)
                assert info.value.rcvd is not None
                assert (info.value.rcvd.code, info.value.rcvd.reason) == (1012, "service restart")
    finally:
        results = load.stop()
    summary = results.summary()
    assert results.failures() == [], summary
    assert summary["attempts"] >= 40, summary  # the load really ran
    after = supervisor.status()
    assert all(state == "RUNNING" for state, _ in after.values()), after
    assert len({pid for _, pid in after.values()} - before) == 4
    assert_one_at_a_time(supervisor)


def test_rolling_restart_script_stops_when_a_process_does_not_come_back(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("async def handler(ws):\n    await ws.send('hi')\n")
    sv = Supervisor(tmp_path, "supervisord.conf", options="--app app:handler")
    try:
        sv.wait_running()
        before = sv.status()
        (tmp_path / "app.py").write_text("def broken(:\n")  # new code that cannot import
        result = sv.rolling_restart("--timeout", "5", timeout=120)
        assert result.returncode == 1
        assert "rolling-restart: wsfleet:wsfleet_00 is not RUNNING" in result.stderr
        assert "stopping here" in result.stderr
        # It stopped there: the other three still run their old processes.
        after = sv.status()
        for name in ("wsfleet:wsfleet_01", "wsfleet:wsfleet_02", "wsfleet:wsfleet_03"):
            assert after[name] == before[name]
    finally:
        sv.cleanup()


def test_rolling_restart_starts_what_supervisord_leaves_exited(tmp_path: Path) -> None:
    """With supervisord's default `autorestart = unexpected`, a worker that exits 0 after
    its restart's drain is not started again by supervisord: the rolling restart starts it."""
    sv = Supervisor(
        tmp_path, "supervisord.conf", replace={"autorestart = true": "autorestart = unexpected"}
    )
    try:
        sv.wait_running()
        before = sv.pids()
        result = sv.rolling_restart("--timeout", "20", timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        after = sv.status()
        assert all(state == "RUNNING" for state, _ in after.values()), after
        assert len({pid for _, pid in after.values()} - before) == 4
    finally:
        sv.cleanup()


def test_shutdown_leaves_nothing_running(supervisor: Supervisor) -> None:
    workers = supervisor.pids()
    result = supervisor.ctl("shutdown")
    assert result.returncode == 0, result.stdout
    wait_for(lambda: gone(supervisor.pid), 30, "supervisord to exit")
    assert all(gone(pid) for pid in workers)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", supervisor.port), timeout=5).close()


def test_fcgi_variant_shares_supervisords_socket(fcgi_supervisor: Supervisor) -> None:
    assert echo_once(fcgi_supervisor.url) == "hi"
    before = fcgi_supervisor.pids()
    result = fcgi_supervisor.rolling_restart(timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not fcgi_supervisor.pids() & before
    assert_one_at_a_time(fcgi_supervisor)
    # The workers inherited one socket: supervisord holds it, not a bind of their own.
    assert echo_once(fcgi_supervisor.url) == "hi"


def test_supervisord_conf_numbers_agree_with_wsfleet() -> None:
    for name in ("supervisord.conf", "supervisord-fcgi.conf"):
        parser = configparser.RawConfigParser()
        parser.read(ROOT / "conf" / name)
        (section,) = [s for s in parser.sections() if s.endswith("program:wsfleet")]
        program = parser[section]
        graceful = float(re.search(r"--graceful-timeout (\S+)", program["command"]).group(1))
        assert graceful == cfg.Config().graceful_timeout
        # A lone worker's drain: its window, then at most the graceful timeout.
        assert float(program["stopwaitsecs"]) > cfg.Config().drain_window + graceful
        assert program["stopsignal"] == "TERM"
        assert program["numprocs"] == "4"
        assert program["process_name"] == "%(program_name)s_%(process_num)02d"
        assert "%(ENV_" not in (ROOT / "conf" / name).read_text()


def test_systemd_unit_agrees_with_wsfleet() -> None:
    service = unit_file("wsfleet.service")["Service"]
    assert service["Type"] == "notify-reload"  # SIGHUP by systemd; RELOADING=1/READY=1 back
    assert float(service["WatchdogSec"]) >= 2  # the master's loop wakes at least every second
    assert service["KillSignal"] == "SIGTERM"
    graceful = float(re.search(r"WSFLEET_GRACEFUL_TIMEOUT=(\S+)", service["Environment"])[1])
    # Above the master's own deadline for a draining worker, which it kills then.
    assert float(service["TimeoutStopSec"]) > cfg.drain_limit(cfg.Config(graceful_timeout=graceful))
    assert int(service["LimitNOFILE"]) >= 10_000
    assert " start " in service["ExecStart"]


def unit_file(name: str) -> configparser.RawConfigParser:
    unit = configparser.RawConfigParser(strict=False)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(ROOT / "conf" / name)
    return unit


def test_the_socket_unit_starts_the_services_command_on_its_socket(spawn, tmp_path) -> None:
    """conf/wsfleet.socket with conf/wsfleet.service: the service's command line, started as
    systemd would start it for that socket (systemd-socket-activate, on 127.0.0.1 and a free
    port), serves the socket it is given, not the address in the service's environment."""
    listen = unit_file("wsfleet.socket")["Socket"]
    service = unit_file("wsfleet.service")["Service"]
    environment = dict(item.split("=", 1) for item in service["Environment"].split())
    assert listen["ListenStream"] == f"{environment['WSFLEET_HOST']}:{environment['WSFLEET_PORT']}"
    assert int(listen["Backlog"]) == cfg.Config().backlog
    command = shlex.split(service["ExecStart"])
    assert command[0] == "/opt/wsfleet/venv/bin/wsfleet"
    args = [arg.replace(f"/run/{service['RuntimeDirectory']}/", f"{tmp_path}/") for arg in command]
    write_app(tmp_path, "v1")
    port, unused = free_port(), free_port()
    environment.update(WSFLEET_HOST="127.0.0.1", WSFLEET_PORT=str(unused))
    proc = spawn(
        *args[1:],
        program=(
            "systemd-socket-activate",
            "-l",
            f"127.0.0.1:{port}",
            sys.executable,
            "-m",
            "wsfleet",
        ),
        cwd=tmp_path,
        env=environment,
    )
    proc.wait_line(f"Listening on 127.0.0.1:{port} as 3")
    assert echo_once(f"ws://127.0.0.1:{port}/", "version?", timeout=15) == "v1"
    assert proc.wait_ready() == port
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", unused), timeout=5).close()
    pidfile = tmp_path / "wsfleet.pid"
    assert control.read_pid(str(pidfile)) == proc.pid
    proc.signal(signal.SIGTERM)
    assert proc.wait(60) == 0


def received_until(notify: socket.socket, line: str) -> list[str]:
    """The datagrams on a notification socket, up to the first holding that line."""
    messages = []
    while True:
        messages.append(notify.recv(4096).decode())
        if line in messages[-1].splitlines():
            return messages


def test_master_notifies_systemd_when_ready(spawn, tmp_path: Path) -> None:
    """Type=notify: READY=1 on $NOTIFY_SOCKET once every worker accepts."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify.sock"))
        notify.settimeout(15)
        master = Master(
            spawn, tmp_path, "-w", "2", env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
        )
        message = received_until(notify, "READY=1")[-1]
    assert f"MAINPID={master.proc.pid}" in message
    assert echo_once(master.url) == "hi"


def test_master_tells_systemd_reloads_stops_status_and_watchdog(spawn, tmp_path: Path) -> None:
    """Type=notify-reload and WatchdogSec=, read as systemd reads them: a Unix datagram
    socket as $NOTIFY_SOCKET."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify.sock"))
        notify.settimeout(15)
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
        master = Master(spawn, tmp_path, "-w", "2", "--drain-window", "0", env=env)
        booted = received_until(notify, "READY=1")
        # (A datagram holds several lines: the first STATUS= may come with WATCHDOG=1.)
        assert any(line.startswith("STATUS=") for m in booted for line in m.splitlines())
        # The watchdog: every half WATCHDOG_USEC (0.2 s) while the loop runs.
        pings = received_until(notify, "WATCHDOG=1")
        started = time.monotonic()
        for _ in range(3):
            pings += received_until(notify, "WATCHDOG=1")
        assert time.monotonic() - started < 2.0
        master.proc.signal(signal.SIGHUP)
        reload = received_until(notify, "RELOADING=1")[-1].splitlines()
        usec = next(int(x.partition("=")[2]) for x in reload if x.startswith("MONOTONIC_USEC="))
        assert abs(usec / 1e6 - time.monotonic()) < 5  # CLOCK_MONOTONIC, as systemd wants
        after = received_until(notify, "READY=1")
        assert any("2/2 workers ready" in m for m in after + received_until(notify, "WATCHDOG=1"))
        master.proc.signal(signal.SIGTERM)
        received_until(notify, "STOPPING=1")
        assert master.proc.wait(30) == 0


def test_kubernetes_manifest_agrees_with_wsfleet() -> None:
    documents = list(yaml.safe_load_all((ROOT / "conf" / "kubernetes.yaml").read_text()))
    kinds = {doc["kind"]: doc for doc in documents}
    assert set(kinds) == {"Deployment", "Service", "PodDisruptionBudget"}
    for doc in documents:  # the current Kubernetes schemas, strict: no unknown field
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    defaults = cfg.Config()
    assert container["command"][:2] == ["wsfleet", "start"]
    assert int(env["WSFLEET_PORT"]) == defaults.port
    assert container["ports"][0]["containerPort"] == defaults.port
    assert float(env["WSFLEET_GRACEFUL_TIMEOUT"]) == defaults.graceful_timeout
    assert container["readinessProbe"]["httpGet"]["path"] == defaults.health_path
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # The kubelet's SIGKILL comes after the grace period, which counts preStop too.
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + cfg.drain_limit(defaults)
    service = kinds["Service"]["spec"]
    assert service["ports"][0]["targetPort"] == container["ports"][0]["name"]
    assert service["selector"] == kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    budget = kinds["PodDisruptionBudget"]["spec"]
    assert budget["selector"] == kinds["Deployment"]["spec"]["selector"]
    # Memory: the limit leaves room for a reload (old workers hold their connections while
    # the new ones fill up); the request covers the connections the comment sizes it for.
    memory = container["resources"]
    assert memory["limits"]["memory"] == "1Gi" and memory["requests"]["memory"] == "512Mi"


def test_the_rolling_restart_script_needs_wsfleet_and_says_so() -> None:
    """From a checkout, with a Python that does not have wsfleet: one line, no traceback."""
    result = subprocess.run(
        [sys.executable, "-I", "-S", str(ROOT / "scripts" / "rolling-restart"), "x.conf"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    assert result.returncode == 1
    assert (
        result.stderr.count("\n") == 1
        and "wsfleet is not installed for this Python" in result.stderr
    )


def test_serving_needs_only_websockets_setproctitle_and_uvloop() -> None:
    """`pip install .` installs what serving needs; supervisord's set-up has its extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=; \[]", d)[0] for d in project["dependencies"]}
    assert names == {"websockets", "setproctitle", "uvloop"}
    assert "supervisor>=4.2" in project["optional-dependencies"]["supervisor"]
    assert project["optional-dependencies"]["metrics"] == ["prometheus-client>=0.20"]
