"""`wsfleet stop|reload|status`, `--daemon`, reloads that re-read the configuration or meet
broken code, and the `wsfleet.run()` API."""

from __future__ import annotations

import os
import pwd
import signal
import socket
import sys
import textwrap
from pathlib import Path

import psutil

from wsfleet.notify import READY

from .support.harness import Process, free_port, gone
from .support.helpers import VERSIONED_APP, Master, app_master, echo_once, run_wsfleet, write_app


def test_stop_waits_until_the_master_has_exited(spawn, tmp_path: Path) -> None:
    master = Master(spawn, tmp_path, "-w", "2")
    workers = master.worker_pids()
    result = run_wsfleet(["stop", "--pidfile", master.pidfile])
    assert result.returncode == 0, result.stderr
    assert f"master {master.proc.pid} stopped" in result.stdout
    # When stop returns, the master and its workers are gone and so is the pidfile.
    assert gone(master.proc.pid)
    assert all(gone(pid) for pid in workers)
    assert not os.path.exists(master.pidfile)


def test_stop_gives_up_after_its_timeout(spawn, tmp_path: Path) -> None:
    master = app_master(
        spawn, tmp_path, "import time\n\nasync def handler(ws):\n    time.sleep(600)\n", "-w", "1"
    )
    from websockets.sync.client import connect

    with connect(master.url):  # the handler blocks the worker's loop: no drain can finish
        result = run_wsfleet(["stop", "--pidfile", master.pidfile, "--timeout", "0.5"])
    assert result.returncode == 1
    assert "still running 0.5s after SIGTERM" in result.stderr


def test_status_and_stop_without_a_master_exit_1(tmp_path: Path) -> None:
    missing = str(tmp_path / "none.pid")
    for command in ("status", "stop", "reload"):
        result = run_wsfleet([command, "--pidfile", missing])
        assert result.returncode == 1
        assert f"no pidfile at {missing}" in result.stderr
    stale = tmp_path / "stale.pid"
    stale.write_text(f"{os.getpid()}\n")  # a live process, but not a wsfleet master
    result = run_wsfleet(["status", "--pidfile", str(stale)])
    assert result.returncode == 1
    assert "stale pidfile" in result.stderr
    # Without a pidfile, the master listening on the address: none on a free port.
    port = free_port()
    result = run_wsfleet(["status", "--port", str(port)])
    assert result.returncode == 1
    user = pwd.getpwuid(os.geteuid()).pw_name
    assert f"no wsfleet master of user {user} listens on 127.0.0.1:{port}" in result.stderr


def test_a_second_master_on_the_same_pidfile_is_refused(spawn, tmp_path: Path) -> None:
    master = Master(spawn, tmp_path, "-w", "1")
    result = run_wsfleet(["start", "-w", "1", "--port", "0", "--pidfile", master.pidfile])
    assert result.returncode == 1
    assert f"(pid {master.proc.pid}) already runs with pidfile {master.pidfile}" in result.stderr
    assert os.path.exists(master.pidfile)  # the first one's pidfile is untouched


def test_reload_command_restarts_every_worker(spawn, tmp_path: Path) -> None:
    master = Master(spawn, tmp_path, "-w", "2")
    before = master.worker_pids()
    result = run_wsfleet(["reload", "--pidfile", master.pidfile])
    assert result.returncode == 0, result.stderr
    master.proc.wait_line("rolling restart done")
    master.wait_workers(2)
    assert not master.worker_pids() & before


def test_reload_rereads_the_config_file(spawn, tmp_path: Path) -> None:
    toml = tmp_path / "wsfleet.toml"
    toml.write_text("max_size = 100\nworkers = 1\n")
    master = Master(spawn, tmp_path, "--config", str(toml))  # -w here would beat the file
    toml.write_text("max_size = 200\nworkers = 2\n")
    master.proc.signal(signal.SIGHUP)
    master.proc.wait_line("rolling restart done")
    master.proc.wait_line(r"max_size=200")
    master.wait_workers(2)  # and the new worker count


def test_reload_with_a_broken_config_file_keeps_the_running_configuration(
    spawn, tmp_path: Path
) -> None:
    toml = tmp_path / "wsfleet.toml"
    toml.write_text("max_size = 100\nworkers = 1\n")
    master = Master(spawn, tmp_path, "--config", str(toml))
    toml.write_text("max_size = [\n")
    result = run_wsfleet(["reload", "--wait", "--pidfile", master.pidfile], timeout=60)
    # The code was reloaded, the configuration was not: a deploy script hears it (exit 1).
    assert result.returncode == 1
    assert "rolling restart done with the old configuration:" in result.stderr
    assert "wsfleet.toml: invalid TOML" in result.stderr
    master.wait_workers(1)
    assert master.proc.output.count("max_size=100,") == 2  # the new worker, old settings
    assert echo_once(master.url) == "hi"


def test_reload_wait_reports_broken_code_and_the_old_workers_keep_serving(spawn, tmp_path):
    """`wsfleet reload --wait` tells a deploy script how the rolling restart went."""
    master = app_master(spawn, tmp_path, VERSIONED_APP.format(version="v1"), "-w", "2")
    before = master.worker_pids()
    (tmp_path / "app.py").write_text("def broken(:\n")
    result = run_wsfleet(["reload", "--wait", "--pidfile", master.pidfile], timeout=60)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "rolling restart failed: worker" in line and "exited (exit status 4)" in line
    assert "cannot import --app app:handler: SyntaxError" in line
    # The log shows where, under the master's line (the worker no longer logs it itself).
    master.proc.wait_line(f'^  File "{tmp_path / "app.py"}", line 1$')
    master.proc.wait_line("^SyntaxError: invalid syntax$")
    assert master.proc.lines.count("SyntaxError: invalid syntax") == 1, master.proc.output
    assert master.worker_pids() == before
    assert echo_once(master.url, "version?") == "v1"
    status = run_wsfleet(["status", "--pidfile", master.pidfile]).stdout
    assert "last rolling restart: failed: worker" in status
    # Fixed code: the next reload goes through, and --wait says so once it is over.
    write_app(tmp_path, "v2")
    result = run_wsfleet(["reload", "--wait", "--pidfile", master.pidfile], timeout=60)
    assert result.returncode == 0, result.stderr
    assert "rolling restart done" in result.stdout
    # The old workers drain only now: one could still take (and close with 1012) a connection.
    master.wait_workers(2)
    assert echo_once(master.url, "version?") == "v2"


def test_daemon_detaches_and_stops(tmp_path: Path) -> None:
    pidfile = tmp_path / "d.pid"
    log = tmp_path / "d.log"
    unix = tmp_path / "d.sock"
    result = run_wsfleet(
        [
            "start",
            "--daemon",
            "-w",
            "2",
            "--bind",
            "127.0.0.1:0",
            "--bind",
            f"unix:{unix}",
            "--pidfile",
            str(pidfile),
            "--log-file",
            str(log),
        ]
    )
    pid = int(pidfile.read_text()) if pidfile.exists() else None
    try:
        assert result.returncode == 0, result.stderr
        match = READY.search(result.stderr)
        assert match and match.group(1) == "127.0.0.1", result.stderr
        # The command prints what the master printed: one line per address; and its log.
        assert result.stderr.splitlines() == [
            match.group(0),
            f"listening on unix:{unix}",
            f"logging to {log}",
        ]
        assert pid is not None and psutil.Process(pid).ppid() != os.getpid()
        assert echo_once(f"ws://127.0.0.1:{match.group(2)}/") == "hi"
        stop = run_wsfleet(["stop", "--pidfile", str(pidfile)])
        assert stop.returncode == 0, stop.stderr
        assert gone(pid) and not unix.exists()
        assert f"master {pid} exiting" in log.read_text()
    finally:
        if pid is not None and psutil.pid_exists(pid):
            for child in psutil.Process(pid).children(recursive=True):
                child.kill()
            os.kill(pid, signal.SIGKILL)


def test_daemon_reports_a_failed_start(tmp_path: Path) -> None:
    result = run_wsfleet(
        [
            "start",
            "--daemon",
            "-w",
            "1",
            "--port",
            "0",
            "--app",
            "nosuch:handler",
            "--log-file",
            str(tmp_path / "d.log"),
        ],
        cwd=tmp_path,
    )
    # What the foreground start would say and do: the reason, and exit status 4.
    assert result.returncode == 4, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("wsfleet: error: cannot start:") and "No module named 'nosuch'" in line
    assert "No module named 'nosuch'" in (tmp_path / "d.log").read_text()


def test_daemon_reports_why_without_a_log_file(tmp_path: Path) -> None:
    """The reason reaches the command even when the master's own stderr is /dev/null."""
    taken = socket.socket()
    with taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_wsfleet(["start", "--daemon", "-w", "1", "--port", str(port)], cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert f"address 127.0.0.1:{port} is already in use" in result.stderr
    # Its default log file (tests/test_commands.py) says it too.
    assert f"address 127.0.0.1:{port} is already in use" in (tmp_path / "wsfleet.log").read_text()


RUN_SCRIPT = """
import wsfleet


async def shout(websocket):
    async for message in websocket:
        await websocket.send(message.upper())


if __name__ == "__main__":
    raise SystemExit(wsfleet.run(shout, workers=2, port=0, graceful_timeout=5))
"""


def test_python_api_runs_the_same_master(tmp_path: Path) -> None:
    script = tmp_path / "serve.py"
    script.write_text(textwrap.dedent(RUN_SCRIPT))
    runner = Process([str(script)], cwd=tmp_path, program=[sys.executable])
    try:
        port = runner.wait_ready()
        assert echo_once(f"ws://127.0.0.1:{port}/", "loud") == "LOUD"
        assert len(runner.workers()) == 2
        runner.signal(signal.SIGTERM)
        assert runner.wait() == 0
    finally:
        runner.kill()
