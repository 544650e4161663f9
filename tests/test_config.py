"""Configuration: precedence of the four sources, and clear errors (exit 2) on bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

import wsfleet
from wsfleet import config as cfg

from .support.helpers import run_wsfleet


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_defaults() -> None:
    config = cfg.load("worker", {}, environ={})
    assert (config.host, config.port, config.app) == ("127.0.0.1", 8765, "wsfleet.echo:echo")
    assert config.graceful_timeout == 30 and config.health_path == "/health/"
    assert config.workers >= 1


def test_precedence_cli_over_env_over_file_over_default(tmp_path: Path) -> None:
    toml = write(tmp_path / "w.toml", "port = 1111\nmax_size = 100\nmax_queue = 3\n")
    env = {"WSFLEET_PORT": "2222", "WSFLEET_MAX_SIZE": "200"}
    config = cfg.load("worker", {"port": 3333}, toml, env)
    assert config.port == 3333  # command line wins
    assert config.max_size == 200  # environment over file
    assert config.max_queue == 3  # file over default
    assert config.write_limit == 2**15  # default
    assert cfg.load("worker", {}, None, {"WSFLEET_CONFIG": toml}).port == 1111


def test_precedence_through_the_real_command(spawn, tmp_path: Path) -> None:
    """The worker's start line shows which source won, option by option."""
    toml = write(tmp_path / "w.toml", "max_size = 100\nmax_queue = 3\nwrite_limit = 7\n")
    proc = spawn(
        "worker",
        "--port",
        "0",
        "--config",
        toml,
        "--max-size",
        "300",
        env={"WSFLEET_MAX_SIZE": "200", "WSFLEET_MAX_QUEUE": "4"},
    )
    proc.wait_line(r"max_size=300, max_queue=4, write_limit=7,")


def test_file_options_of_the_other_command_are_ignored(tmp_path: Path) -> None:
    toml = write(tmp_path / "w.toml", "workers = 3\nport = 9\n")
    assert cfg.load("worker", {}, toml, {}).port == 9


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port = 'abc'\n", "w.toml:1: port: expected an integer, got 'abc'"),
        ("host = 'x'\n\nport = 70000\n", "w.toml:3: port: expected an integer between 0 and 65535"),
        ("prot = 1\n", "w.toml:1: unknown option 'prot' (did you mean 'port'?)"),
        ("zzz = 1\n", "w.toml:1: unknown option 'zzz' (known: access_log, admin,"),
        ("port = '8765'\n", "w.toml:1: port: expected an integer, got '8765'"),
        ("max_size = true\n", "w.toml:1: max_size: expected an integer, got True"),
        ("graceful_timeout = '5'\n", "graceful_timeout: expected a number, got '5'"),
        ("loop = 1\n", "w.toml:1: loop: expected a string, got 1"),
        ("port = \n", "w.toml: invalid TOML: Invalid value (at line 1, column 8)"),
        ("compression = 'gzip'\n", "compression: expected one of deflate, none, got 'gzip'"),
        ("app = 'noseparator'\n", "app: expected MODULE:ATTR"),
        ("graceful_timeout = -1\n", "graceful_timeout: expected a non-negative number"),
    ],
)
def test_bad_file_names_the_line(tmp_path: Path, text: str, message: str) -> None:
    toml = write(tmp_path / "w.toml", text)
    with pytest.raises(cfg.ConfigError, match=None) as info:
        cfg.load("worker", {}, toml, {})
    assert message in str(info.value)


def test_cli_bad_option_is_exit_2_on_one_line() -> None:
    result = run_wsfleet(["worker", "--prot", "1"])
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "wsfleet worker: error: unrecognized arguments: --prot" in result.stderr
    assert "(did you mean '--port'?) (see 'wsfleet worker --help')" in result.stderr


def test_toml_types_are_not_coerced(tmp_path: Path) -> None:
    """workers = "4" is refused as daemon = 1 is: TOML has types."""
    for text, message in (
        ("workers = '4'\n", "workers: expected an integer, got '4'"),
        ("daemon = 1\n", "daemon: expected a boolean, got 1"),
    ):
        toml = write(tmp_path / "s.toml", text)
        result = run_wsfleet(["start", "--config", toml])
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_version() -> None:
    result = run_wsfleet(["--version"])
    assert result.returncode == 0 and result.stdout.strip() == f"wsfleet {wsfleet.__version__}"


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_timeout_must_be_positive(value: str) -> None:
    result = run_wsfleet(["start", "--timeout", value])
    assert result.returncode == 2
    assert (
        result.stderr.strip().count("\n") == 0 and "argument --timeout: expected a" in result.stderr
    )


def test_the_app_may_be_given_as_an_argument(spawn, tmp_path: Path) -> None:
    """As gunicorn and uvicorn take it: `wsfleet worker myapp:handler`."""
    (tmp_path / "myapp.py").write_text("async def handler(ws):\n    await ws.send('mine')\n")
    proc = spawn("worker", "myapp:handler", "--port", "0", cwd=tmp_path)
    proc.wait_ready()
    proc.wait_line("serving app myapp:handler")
    twice = run_wsfleet(["worker", "myapp:handler", "--app", "other:handler"])
    assert twice.returncode == 2 and "the app is given twice" in twice.stderr


def test_cli_bad_value_is_exit_2() -> None:
    result = run_wsfleet(["worker", "--port", "http"])
    assert result.returncode == 2
    assert "argument --port: expected an integer, got 'http'" in result.stderr


def test_bad_env_value_is_exit_2_naming_the_variable() -> None:
    result = run_wsfleet(["worker"], env={"WSFLEET_WINDOW_BITS": "20"})
    assert result.returncode == 2
    assert "WSFLEET_WINDOW_BITS: expected an integer between 9 and 15, got 20" in result.stderr


def test_invalid_toml_is_exit_2_with_the_line(tmp_path: Path) -> None:
    toml = write(tmp_path / "bad.toml", "host = '127.0.0.1'\nport = [\n")
    result = run_wsfleet(["worker", "--config", toml])
    assert result.returncode == 2
    assert f"{toml}: invalid TOML" in result.stderr and "line 2" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreadable_config_file_is_exit_2(tmp_path: Path) -> None:
    result = run_wsfleet(["worker", "--config", str(tmp_path / "missing.toml")])
    assert result.returncode == 2
    assert "cannot read config file" in result.stderr and "No such file" in result.stderr


def test_unwritable_log_file_is_exit_2(tmp_path: Path) -> None:
    result = run_wsfleet(["worker", "--log-file", str(tmp_path / "no" / "dir.log")])
    assert result.returncode == 2
    assert "--log-file" in result.stderr and "cannot open" in result.stderr


def test_example_config_file_is_valid_and_complete() -> None:
    """conf/wsfleet.toml documents every option, with its default value."""
    path = Path(__file__).resolve().parent.parent / "conf" / "wsfleet.toml"
    text = path.read_text()
    for name in cfg.FIELDS:
        assert f"{name} =" in text, f"conf/wsfleet.toml does not document {name}"
    values = cfg.read_file(str(path), "start")  # parses without error
    defaults = cfg.Config()
    for name, value in values.items():
        assert value == getattr(defaults, name), f"{name} in the example is not the default"


@pytest.fixture
def run_checks_only(monkeypatch: pytest.MonkeyPatch) -> list[cfg.Config]:
    """wsfleet.run() up to the point where the master would start: the configurations that
    got there (nothing is started in the test's process)."""
    from wsfleet.master import Master

    started: list[cfg.Config] = []
    monkeypatch.setattr(Master, "run", lambda self: started.append(self.fleet.config) or 0)
    monkeypatch.setattr(wsfleet.logs, "setup", lambda level, path: None)
    return started


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        (
            {"graceful_timout": 5},
            TypeError,
            "run() got an unexpected keyword argument 'graceful_timout' "
            "(did you mean 'graceful_timeout'?)",
        ),
        ({"fd": 3}, TypeError, "'fd' (fd is an option of wsfleet worker, not of start)"),
        ({"daemon": True}, TypeError, "wsfleet start --daemon detaches"),
        # The CLI's own words for the value: wsfleet start --timeout 0.
        ({"timeout": 0}, ValueError, "timeout: expected a positive number of seconds, got 0"),
        # Typed, as in the config file: not coerced from a string.
        ({"workers": "4"}, ValueError, "workers: expected an integer, got '4'"),
        ({"loop": "nope"}, ValueError, "loop: "),
        # Checks across options, as start makes them (exit 2 there).
        ({"certfile": "/nonexistent.pem"}, ValueError, "--certfile /nonexistent.pem: No such"),
        ({"keyfile": "/k.pem"}, ValueError, "--keyfile /k.pem needs --certfile"),
        ({"user": "no-such-user-here"}, ValueError, "--user no-such-user-here: no such user"),
        ({"admin": "0"}, ValueError, "--admin needs --admin-token-file FILE"),
    ],
)
def test_run_refuses_what_start_refuses(
    run_checks_only: list[cfg.Config], options: dict[str, object], error: type, message: str
) -> None:
    with pytest.raises(error) as raised:
        wsfleet.run(**options)
    assert message in str(raised.value)
    assert run_checks_only == []


def test_run_takes_paths_tuples_and_none(run_checks_only: list[cfg.Config], tmp_path) -> None:
    assert wsfleet.run(pidfile=tmp_path / "m.pid", bind=("127.0.0.1:0",), log_file=None) == 0
    (config,) = run_checks_only
    assert config.pidfile == str(tmp_path / "m.pid") and config.bind == ("127.0.0.1:0",)
    assert config.log_file is None


def test_run_log_file_that_cannot_be_opened(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wsfleet.master import Master

    monkeypatch.setattr(Master, "run", lambda self: pytest.fail("the master started"))
    path = tmp_path / "no" / "x.log"
    with pytest.raises(ValueError) as raised:
        wsfleet.run(log_file=str(path))
    assert str(raised.value) == f"--log-file {path}: cannot open: No such file or directory"
