"""The deployment files: the real supervisord and supervisorctl running copies of
conf/supervisord*.conf, scripts/rolling-restart, the systemd units (the service's
notifications, the socket unit under systemd-socket-activate), and the Kubernetes manifest's
agreement with wsfleet's defaults."""

from __future__ import annotations

import configparser
import contextlib
import json
import posixpath
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from wsfleet import cli, control
from wsfleet import config as cfg

from .support import pubsub
from .support.harness import ROOT, Supervisor, end, free_port, gone, wait_for
from .support.helpers import Master, echo_once, run_wsfleet, write_app
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


def test_systemd_units_commented_broker_lines_agree_with_wsfleet() -> None:
    """conf/wsfleet.service's commented lines for a shared Redis: the ExecStart is the
    active one plus the broker's options, which wsfleet takes, and the password file is the
    credential LoadCredential= names, in the directory systemd gives the service."""
    text = (ROOT / "conf" / "wsfleet.service").read_text()
    ((name, source),) = re.findall(r"^#LoadCredential=([\w-]+):(/\S+)$", text, re.M)
    (command,) = re.findall(r"^#ExecStart=(.*)$", text, re.M)
    active = shlex.split(unit_file("wsfleet.service")["Service"]["ExecStart"])
    argv = shlex.split(command)
    assert argv[: len(active)] == active
    args = cli.build_parser().parse_command_line(argv[1:])
    config = cfg.load("start", cli.given_options(args), None, environ={})
    assert config.broker is not None and "@" not in config.broker
    assert config.broker_password_file == "${CREDENTIALS_DIRECTORY}/" + name
    assert source.startswith("/etc/wsfleet/")


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
        # STATUS= follows the workers' count as it changes: before READY=1, or just after it
        # when the master's first look found every worker ready already (a busy machine).
        # (A datagram holds several lines: the first STATUS= may come with WATCHDOG=1.)
        while not any(line.startswith("STATUS=") for m in booted for line in m.splitlines()):
            booted.append(notify.recv(4096).decode())  # (15 s at most: the socket's timeout)
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


MANIFEST = ROOT / "conf" / "kubernetes.yaml"


def manifest() -> dict[tuple[str, str], dict[str, Any]]:
    """conf/kubernetes.yaml's documents by (kind, name)."""
    documents = list(yaml.safe_load_all(MANIFEST.read_text()))
    found = {(doc["kind"], doc["metadata"]["name"]): doc for doc in documents}
    assert len(found) == len(documents)  # (no two documents of one kind and name)
    return found


def container_config(container: dict[str, Any]) -> cfg.Config:
    """The wsfleet container's command line and environment, read as `wsfleet start` reads
    them: an option that does not exist (or a bad value) fails here as it would in the pod."""
    argv = [*container["command"], *container.get("args", [])]
    assert argv[:2] == ["wsfleet", "start"], argv
    try:
        args = cli.build_parser().parse_command_line(argv[1:])
    except SystemExit:
        raise AssertionError(f"wsfleet refuses the manifest's command line: {argv}") from None
    env = {e["name"]: e["value"] for e in container["env"]}
    return cfg.load("start", cli.given_options(args), None, environ=env)


def secret_file(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str]:
    """The Secret and key a container finds at ``path``: a read-only mount of a secret
    volume at the file's directory, whose item is the file's name."""
    directory, name = posixpath.split(path)
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == directory]
    assert mount["readOnly"] is True
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (item,) = [i for i in volume["secret"]["items"] if i["path"] == name]
    return volume["secret"]["secretName"], item["key"]


def test_kubernetes_manifest_agrees_with_wsfleet() -> None:
    docs = manifest()
    assert set(docs) == {
        ("Deployment", "wsfleet"),
        ("Service", "wsfleet"),
        ("PodDisruptionBudget", "wsfleet"),
        ("Service", "wsfleet-admin"),
        ("NetworkPolicy", "wsfleet"),
        ("ConfigMap", "redis-config"),
        ("Service", "redis"),
        ("StatefulSet", "redis"),
        ("NetworkPolicy", "redis"),
    }
    for doc in docs.values():  # the current Kubernetes schemas, strict: no unknown field
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    deployment = docs["Deployment", "wsfleet"]
    assert deployment["spec"]["replicas"] >= 2  # several pods, one Redis
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    config = container_config(container)
    defaults = cfg.Config()
    assert config.port == defaults.port and int(env["WSFLEET_PORT"]) == defaults.port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["ws"] == defaults.port
    assert config.graceful_timeout == defaults.graceful_timeout
    assert container["readinessProbe"]["httpGet"]["path"] == defaults.health_path
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # The kubelet's SIGKILL comes after the grace period, which counts preStop too.
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + cfg.drain_limit(defaults)
    service = docs["Service", "wsfleet"]["spec"]
    assert [p["targetPort"] for p in service["ports"]] == ["ws"]  # not the admin port
    assert service["selector"] == deployment["spec"]["selector"]["matchLabels"]
    budget = docs["PodDisruptionBudget", "wsfleet"]["spec"]
    assert budget["selector"] == deployment["spec"]["selector"]
    # Memory: the limit leaves room for a reload (old workers hold their connections while
    # the new ones fill up); the request covers the connections the comment sizes it for.
    memory = container["resources"]
    assert memory["limits"]["memory"] == "1Gi" and memory["requests"]["memory"] == "512Mi"


def test_kubernetes_manifest_shares_one_redis() -> None:
    """--broker names the redis Service, with no password in it; the password is a file of
    a Secret that Redis reads too, and that the manifest's comment says how to create;
    nothing secret is in an environment variable; Redis keeps what it acknowledged and
    refuses writes when full."""
    docs = manifest()
    pod = docs["Deployment", "wsfleet"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = container_config(container)
    assert config.broker is not None and config.broker_password_file is not None
    url = urllib.parse.urlsplit(config.broker)
    assert url.scheme == "redis" and url.password is None and url.username is None
    redis_service = docs["Service", url.hostname]["spec"]
    (port,) = redis_service["ports"]
    assert port["port"] == url.port
    redis_set = docs["StatefulSet", "redis"]["spec"]
    assert redis_set["serviceName"] == url.hostname
    redis_pod = redis_set["template"]["spec"]
    assert redis_service["selector"] == redis_set["selector"]["matchLabels"]
    assert redis_set["template"]["metadata"]["labels"] == redis_set["selector"]["matchLabels"]
    (redis,) = redis_pod["containers"]
    assert {p["name"]: p["containerPort"] for p in redis["ports"]}[port["targetPort"]] == 6379

    # The password: one Secret's key, a file for wsfleet and for Redis alike.
    password = secret_file(pod, container, config.broker_password_file)
    script = redis["args"][0]
    (read,) = re.findall(r"\$\(cat (\S+)\)", script)
    assert secret_file(redis_pod, redis, read) == password
    created = dict(
        re.findall(
            r"kubectl create secret generic (\S+) --from-literal=(\w+)=", MANIFEST.read_text()
        )
    )
    assert created[password[0]] == password[1]
    for where in (container, redis):
        assert all("valueFrom" not in e for e in where.get("env", []))
    # (that Redis's command line and environment hold no password: run, below)

    # Redis's configuration: the file the script names, from the ConfigMap.
    (conf_path,) = re.findall(r"exec redis-server (\S+) -", script)
    (mount,) = [m for m in redis["volumeMounts"] if m["mountPath"] == posixpath.dirname(conf_path)]
    (volume,) = [v for v in redis_pod["volumes"] if v["name"] == mount["name"]]
    conf_map = docs["ConfigMap", volume["configMap"]["name"]]["data"]
    settings = redis_settings(conf_map[posixpath.basename(conf_path)])
    assert settings["port"] == "6379"
    assert settings["appendonly"] == "yes" and settings["appendfsync"] == "always"
    assert settings["save"] == '""'  # (no snapshot to come back to an older state from)
    assert settings["maxmemory-policy"] == "noeviction"
    limit = quantity(redis["resources"]["limits"]["memory"])
    assert quantity(settings["maxmemory"]) < limit  # (room for the rewrite's fork)
    (data,) = [m for m in redis["volumeMounts"] if m["name"] == "data"]
    assert settings["dir"] == data["mountPath"]
    (claim,) = redis_set["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    # Only the wsfleet pods reach Redis.
    policy = docs["NetworkPolicy", "redis"]["spec"]
    assert policy["podSelector"]["matchLabels"] == redis_set["selector"]["matchLabels"]
    ((rule,),) = [r["from"] for r in policy["ingress"]]
    wsfleet_labels = docs["Deployment", "wsfleet"]["spec"]["template"]["metadata"]["labels"]
    assert rule["podSelector"]["matchLabels"].items() <= wsfleet_labels.items()


def test_kubernetes_manifest_admin_api_is_for_the_cluster_only() -> None:
    """The admin API: its own Service (not the public one), its token a Secret's file, and a
    NetworkPolicy that lets only labelled pods reach its port, and anyone the WebSocket's."""
    docs = manifest()
    deployment = docs["Deployment", "wsfleet"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    config = container_config(container)
    assert config.admin is not None and config.admin_token_file is not None
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert config.admin == f"0.0.0.0:{ports['admin']}"
    token = secret_file(pod, container, config.admin_token_file)
    created = dict(
        re.findall(
            r"kubectl create secret generic (\S+) --from-literal=(\w+)=", MANIFEST.read_text()
        )
    )
    assert created[token[0]] == token[1]
    admin = docs["Service", "wsfleet-admin"]["spec"]
    assert admin["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert [p["targetPort"] for p in admin["ports"]] == ["admin"]
    assert "type" not in admin  # ClusterIP: no load balancer in front of it
    policy = docs["NetworkPolicy", "wsfleet"]["spec"]
    assert policy["podSelector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    rules = {tuple(p["port"] for p in r["ports"]): r.get("from") for r in policy["ingress"]}
    assert rules[("ws",)] is None  # from anywhere
    (publishers,) = rules[("admin",)]
    assert publishers["podSelector"]["matchLabels"] == {"wsfleet-publisher": "true"}
    assert set(ports) == {"ws", "admin"}


def redis_settings(text: str) -> dict[str, str]:
    """A redis.conf's directives (the last one of each name wins, as in Redis)."""
    settings = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.strip().partition(" ")
            settings[name] = value.strip()
    return settings


def quantity(text: str) -> int:
    """Bytes of a Kubernetes quantity (1Gi) or a Redis size (768mb)."""
    units = {"gi": 2**30, "mi": 2**20, "ki": 2**10, "gb": 2**30, "mb": 2**20, "kb": 2**10}
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", text)
    assert match is not None, text
    return int(match[1]) * units[match[2].lower()] if match[2] else int(match[1])


def test_kubernetes_commands_run_here(spawn, tmp_path: Path) -> None:
    """The manifest's Redis (its command line and configuration) and wsfleet (its command
    line, environment and secret files) run on this machine, paths and addresses moved into
    the test's directory: Redis asks for the Secret's password and keeps it out of its
    command line and environment, and refuses to start with an empty one; wsfleet connects
    with the password file; a publish as `kubectl exec deploy/wsfleet -- wsfleet publish`
    runs it (the container's environment, no pidfile) and one through the admin API with the
    token reach a subscriber."""
    docs = manifest()
    redis_pod = docs["StatefulSet", "redis"]["spec"]["template"]["spec"]
    (redis,) = redis_pod["containers"]
    secrets, etc, data = tmp_path / "secrets", tmp_path / "etc", tmp_path / "data"
    for directory in (secrets / "redis", secrets / "wsfleet-admin", etc, data):
        directory.mkdir(parents=True)
    redis_port, ws_port, admin_port = free_port(), free_port(), free_port()
    conf = docs["ConfigMap", "redis-config"]["data"]["redis.conf"]
    conf = re.sub(r"^port .*$", f"port {redis_port}", conf, flags=re.M)
    conf = re.sub(r"^bind .*$", "bind 127.0.0.1", conf, flags=re.M)
    conf = re.sub(r"^dir .*$", f"dir {data}", conf, flags=re.M)
    (etc / "redis.conf").write_text(conf)
    script = redis["args"][0].replace("/run/secrets/", f"{secrets}/")
    script = script.replace("/etc/redis/", f"{etc}/")
    redis_argv = [*redis["command"], script]
    password_file = secrets / "redis" / "password"

    password_file.write_text("")  # the Secret not filled in: Redis does not start
    refused = subprocess.run(redis_argv, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1 and "empty password" in refused.stderr, refused

    password = "0123456789abcdef" * 4  # (openssl rand -hex 32 writes such a word)
    password_file.write_text(password + "\n")  # (kubectl --from-literal adds no newline)
    log = open(tmp_path / "redis.log", "wb")  # noqa: SIM115 (the child's, closed below)
    server = subprocess.Popen(redis_argv, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        wait_for(lambda: redis_answers(redis_port) == b"-NOAUTH", 10, "Redis from the manifest")
        for part in ("cmdline", "environ"):
            assert password.encode() not in Path(f"/proc/{server.pid}/{part}").read_bytes()

        pod = docs["Deployment", "wsfleet"]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        argv = [
            arg.replace("/run/secrets/", f"{secrets}/")
            .replace("redis://redis:6379/", f"redis://127.0.0.1:{redis_port}/")
            .replace("=0.0.0.0:8766", f"=127.0.0.1:{admin_port}")
            for arg in [*container["command"], *container["args"]]
        ]
        assert argv != [*container["command"], *container["args"]]
        env = {e["name"]: e["value"] for e in container["env"]}
        env.update(WSFLEET_HOST="127.0.0.1", WSFLEET_PORT=str(ws_port))
        (secrets / "wsfleet-admin" / "token").write_text("t0ken")
        (tmp_path / "app.py").write_text(pubsub.APP)
        spawn(*argv[1:], cwd=tmp_path, env=env).wait_ready()

        def broker() -> str:
            shown = run_wsfleet(["status", "--json"], env=env, cwd=tmp_path)
            return str(json.loads(shown.stdout)["broker"]["state"]) if shown.stdout else ""

        wait_for(lambda: broker() == "connected", 10, "the broker connected")
        with pubsub.Clients() as clients:
            subscriber = pubsub.Subscriber(f"ws://127.0.0.1:{ws_port}/", "news")
            clients.run(subscriber.connect())
            published = run_wsfleet(["publish", "news", "from kubectl exec"], env=env)
            assert published.returncode == 0 and published.stdout.strip() == "1", published
            request = urllib.request.Request(
                f"http://127.0.0.1:{admin_port}/publish/news",
                data=b"from a backend",
                headers={"Authorization": "Bearer t0ken", "Content-Type": "text/plain"},
            )
            with urllib.request.urlopen(request, timeout=10) as answer:
                assert json.loads(answer.read()) == {"offset": 2}
            clients.run(pubsub.settle([subscriber], "from a backend"))
            texts = [text for _, _, text in subscriber.received]
            assert texts == ["from kubectl exec", "from a backend"]
    finally:
        end(server.pid)
        server.wait(10)


def redis_answers(port: int) -> bytes:
    """The start of Redis's answer to PING (b"" while it does not listen)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).split(b" ")[0]
    except OSError:
        return b""


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
