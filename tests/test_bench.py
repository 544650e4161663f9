"""`wsfleet bench`: the load client against a real worker; a user's command, so it also runs
from a plain `pip install .` in a fresh virtual environment (no test or bench extras)."""

from __future__ import annotations

import contextlib
import json
import shlex
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import trustme

from wsfleet import bench

from .support.harness import free_port, wait_for
from .support.helpers import run_wsfleet, start_worker
from .support.newcomer import Newcomer


def test_bench_reports_throughput_and_round_trips(spawn) -> None:
    _, port = start_worker(spawn, "--compression", "none")
    result = run_wsfleet(
        [
            "bench",
            f"ws://127.0.0.1:{port}/",
            "-c",
            "6",
            "-k",
            "2",
            "-s",
            "100",
            "-t",
            "1",
            "-p",
            "2",
            "--json",
        ],
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["connected"] == 6 and report["processes"] == 2
    assert report["messages"] > 100
    assert report["messages_per_s"] > 0
    assert 0 < report["p50_ms"] <= report["p99_ms"]
    assert report["connect_errors"] == {}
    assert report["close_codes"] == {"1000": 6}  # the client closes every connection itself


def test_bench_over_tls_and_with_proxy_headers(spawn, tmp_path: Path) -> None:
    """The load client speaks wss:// (--cafile) and the PROXY protocol, for the servers that
    expect them (what scripts/bench-throughput --tls and wsfleet-proxy-protocol measure)."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    issued.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    tls = ["--certfile", str(tmp_path / "cert.pem"), "--keyfile", str(tmp_path / "key.pem")]
    proc = spawn("worker", "--port", "0", "--proxy-protocol", *tls)
    port = proc.wait_ready()
    client = ["-c", "2", "-t", "0.5", "-p", "1", "--json", "--cafile", str(tmp_path / "ca.pem")]
    result = run_wsfleet(
        ["bench", f"wss://127.0.0.1:{port}/", *client, "--proxy-protocol"], timeout=60
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["connected"] == 2 and report["messages"] > 10 and report["connect_errors"] == {}


def test_bench_counts_what_fails(spawn) -> None:
    _, port = start_worker(spawn, "--compression", "none")
    # The health path answers plain HTTP 200 instead of a handshake: every connection fails.
    result = run_wsfleet(["bench", f"ws://127.0.0.1:{port}/health/", "-c", "3", "-t", "0.5"])
    assert result.returncode == 1
    assert "connection errors: {'HTTP 200': 3}" in result.stdout


def test_bench_needs_a_ws_url() -> None:
    result = run_wsfleet(["bench", "http://127.0.0.1:1/"])
    assert result.returncode == 2
    assert "expected a ws:// URL" in result.stderr


def test_bench_memory_measures_each_setting() -> None:
    """Any valid setting, not only the built-in list (11/3 is not in it)."""
    result = run_wsfleet(
        ["bench", "memory", "-n", "30", "--settings", "12/5,11/3,none", "--json"], timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    rows = report["settings"]
    assert set(rows) == {"12/5", "11/3", "none"}
    assert rows["12/5"]["size_vs_default"] == 1.0
    assert rows["none"]["size_vs_default"] > rows["11/3"]["size_vs_default"] >= 1.0
    for row in rows.values():
        assert row["errors"] == 0
        assert row["tracemalloc_kib"] > 0 and row["rss_kib"] > 0
    # Compression state is what a connection costs most: off is far cheaper than 12/5.
    assert rows["none"]["tracemalloc_kib"] < rows["12/5"]["tracemalloc_kib"] / 2


def test_bench_memory_reads_memory_as_psutil_does() -> None:
    """RSS and USS read from /proc (a plain install has no psutil) are psutil's figures, for a
    stopped process, whose memory cannot change between the two readings."""
    stop = "import os, signal; os.kill(os.getpid(), signal.SIGSTOP)"
    proc = subprocess.Popen([sys.executable, "-c", stop])
    try:
        stopped = psutil.Process(proc.pid)
        wait_for(lambda: stopped.status() == psutil.STATUS_STOPPED, what="the process to stop")
        memory = stopped.memory_full_info()
        assert bench.rss_uss(proc.pid) == (memory.rss, memory.uss)
    finally:
        proc.kill()
        proc.wait(10)


def test_bench_help_names_every_default() -> None:
    result = run_wsfleet(["bench", "--help"])
    assert result.returncode == 0
    for text in ("connections in all (default: 50)", "(default: 4)", "(default: 64)", "10.0"):
        assert text in " ".join(result.stdout.split()), result.stdout


def test_bench_options_of_the_other_kind_are_refused() -> None:
    """`bench URL` and `bench memory` are one argparse command with two sets of options."""
    result = run_wsfleet(["bench", "memory", "-c", "5"])
    assert (
        result.returncode == 2 and "bench memory: --connections go with bench URL" in result.stderr
    )
    result = run_wsfleet(["bench", "ws://127.0.0.1:1/", "-n", "5"])
    assert result.returncode == 2 and "bench: -n go with bench memory" in result.stderr


def test_bench_memory_rejects_a_bad_setting() -> None:
    result = run_wsfleet(["bench", "memory", "--settings", "16/9"])
    assert result.returncode == 2
    assert "'16/9' is not BITS/LEVEL" in result.stderr


def run_script(script: Path, args: list[str], timeout: float) -> str:
    """A benchmark script's output, once it exited 0; on a timeout or a failure, it is
    stopped (SIGTERM: it stops its servers, clients and Redis) and what is left killed."""
    proc = subprocess.Popen(
        [sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        descendants = (
            psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
        )
        proc.terminate()
        proc.wait(30)
        for child in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    assert proc.returncode == 0, stderr.decode()
    return stdout.decode()


def test_bench_throughput_script_compares_the_servers(tmp_path: Path) -> None:
    """scripts/bench-throughput, shortened: every server starts, serves the client, and stops."""
    out = tmp_path / "throughput.json"
    script = Path(__file__).parent.parent / "scripts" / "bench-throughput"
    args = ["--runs", "1", "--duration", "1", "--compressions", "none,deflate", "--cpu", "--spread"]
    args += ["--json", str(out)]
    table = run_script(script, args, 120)
    for compression in ("none", "deflate"):
        for server in ("recipe", "wsfleet-asyncio", "wsfleet"):
            assert f"| {compression} | {server} |" in table
    assert "connection errors" not in table
    assert "| user µs/msg | sys µs/msg | reads/msg | writes/msg |" in table
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) >= 6
    for run in runs:
        assert run["messages_per_s"][0] > 1000
        assert 0 < run["p50_ms"][0] <= run["p99_ms"][0]
        # CPU is spent serving; an echo server writes at most once per message (counted on
        # uvloop, whose socket calls are read/write; asyncio's recv/send are not: 0).
        costs = run["per_message"]
        assert costs["user_s"][0] > 0, costs
        assert costs["writes"][0] <= 1.5 and costs["reads"][0] <= 1.5, costs
        if run["server"] == "wsfleet":
            assert costs["writes"][0] > 0, costs
        # Every connection held by one of the 2 serving processes (not the hub), counted.
        assert len(run["held"][0]) == 2 and sum(run["held"][0]) == 50, run["held"]


@pytest.mark.timeout(240)
def test_bench_balance_script_samples_a_scale_up_in_both_modes(tmp_path: Path) -> None:
    """scripts/bench-balance, tiny: each scenario (churn; --max-connection-age without churn)
    with each --balance mode scales from 2 to 4 workers and samples the connections per
    worker before and after, with no failed connection; the table has a row for each."""
    out = tmp_path / "balance.json"
    script = Path(__file__).parent.parent / "scripts" / "bench-balance"
    args = ["--connections", "100", "--rounds", "1", "--lifetime", "3", "--age", "3"]
    args += ["--warmup", "1.5", "--after", "3", "--json", str(out)]
    table = run_script(script, args, 180)
    for scenario in ("churn", "age"):
        for mode in ("hash", "least-connections"):
            assert f"| {scenario} | {mode} |" in table, table
    runs = json.loads(out.read_text())["runs"]
    assert [(r["scenario"], r["mode"]) for r in runs] == [
        (scenario, mode) for scenario in ("churn", "age") for mode in ("hash", "least-connections")
    ]
    for run in runs:
        samples = run["samples"]
        assert run["ttin_s"] < 0 and samples[0]["t"] < run["ttin_s"] < samples[-1]["t"], run
        assert len(samples[0]["connections"]) == 2 and len(samples[-1]["connections"]) == 4, run
        before = [sum(s["connections"].values()) for s in samples if s["t"] < run["ttin_s"]]
        assert samples[-1]["t"] >= 3 and max(before) > 80, run  # (as last reported)
        # (a churned connection may be between its close and its replacement's handshake)
        assert run["failed_connects"] == 0 and run["open_at_end"] >= 90, run
        # (the master's weights: none with the hash, one per ready worker when steering)
        steered = run["mode"] == "least-connections"
        assert (samples[-1]["weights"] is not None) == steered, samples[-1]
        if run["scenario"] == "churn":
            assert run["client_closes"] > 0 and run["server_closes"] == 0, run
        else:  # (the server's 1012 at each connection's age; no churn from the clients)
            assert run["client_closes"] == 0 and run["server_closes"] > 0, run
            assert set(run["close_codes"]) == {"1012"}, run
    # The same table again, from the file alone.
    assert run_script(script, ["--report", str(out)], 60) in table


def test_bench_lending_script_compares_lending_with_weight_0_only() -> None:
    """scripts/bench-lending, tiny: with lending, every handshake queued on the killed
    worker's socket is served during the backoff; with weight 0 only, they wait for nobody."""
    script = Path(__file__).parent.parent / "scripts" / "bench-lending"
    table = run_script(script, ["--runs", "1", "--queued", "20", "--backoff", "2"], 120)
    rows = {line.split("|")[1].strip(): line.split("|")[2] for line in table.splitlines()[4:]}
    assert rows["lending"].strip() == "0 (0)", table
    assert int(rows["weight 0 only"].split()[0]) > 0, table


def test_bench_pubsub_script_measures_both_setups(tmp_path: Path) -> None:
    """scripts/bench-pubsub, tiny: one websockets process and a fleet each deliver every
    message to every subscriber in order; the latency, the master's status times and the
    hub's memory are measured."""
    out = tmp_path / "pubsub.json"
    script = Path(__file__).parent.parent / "scripts" / "bench-pubsub"
    args = ["--subscribers", "20", "--processes", "2", "--runs", "1", "--warmup", "0.3"]
    args += ["--duration", "0.5", "--window", "8", "--client-pause", "0.005", "--flood", "2"]
    args += ["--flood-topics", "1", "--memory-topics", "20", "--memory-history", "3"]
    table = run_script(script, [*args, "--json", str(out)], 120)
    assert "| one websockets process, `broadcast` |" in table
    assert "| `wsfleet start -w 2`, `wsfleet.publish` |" in table
    data = json.loads(out.read_text())
    runs = {run["server"]: run for run in data["deliveries"]}
    assert set(runs) == {"single", "fleet"}
    assert sum(runs["fleet"]["spread"]) == 21  # the subscribers and the publisher, counted
    for run in runs.values():
        saturation, latency = run["saturation"], run["latency"]
        assert saturation["deliveries_per_s"] > 1000, run
        # Each message reached each subscriber once, in order: what the figures count.
        assert saturation["gaps"] == saturation["closed"] == 0, run
        assert saturation["cpu"]["clients"] > 0, run
        assert latency["rate"] == runs["single"]["latency"]["rate"]  # the same for both
        assert latency["samples"] > 0 and latency["gaps"] == latency["closed"] == 0, run
        assert 0 < latency["p50_ms"] <= latency["p99_ms"], run
    assert runs["fleet"]["saturation"]["cpu"]["hub"] > 0
    master = data["master"][0]
    assert all(master[name]["requests"] > 0 for name in ("idle", "publishing", "sink")), master
    publishing = master["publishing"]
    assert publishing["published_per_s"] > 0 and publishing["subscribers_closed"] == 0, master
    assert publishing["cpu"]["hub"] > 0, master
    steps = data["memory"]["run"]["steps"]
    assert [step["held"] for step in steps] == [0, 20, 60], steps
    assert steps[-1]["uss"] > 0 and data["memory"]["in_process"]["topic_bytes"] > 0


def test_bench_broker_script_measures_both_setups_and_both_designs(tmp_path: Path) -> None:
    """scripts/bench-broker, tiny: two hosts sharing one redis-server, with wsfleet --broker
    and with the recipe (websockets processes subscribing to Redis themselves), each deliver
    every message to every subscriber of both hosts in order; the latency on each host; and
    a hub's relay by PUB/SUB and by Streams alone, with 1 and 20 topics, without gaps."""
    out = tmp_path / "broker.json"
    script = Path(__file__).parent.parent / "scripts" / "bench-broker"
    args = ["--subscribers", "20", "--processes", "2", "--runs", "1", "--warmup", "0.3"]
    args += ["--duration", "0.5", "--window", "8", "--client-pause", "0.005"]
    args += ["--design-topics", "1,20", "--design-warmup", "0.2", "--design-duration", "0.5"]
    args += ["--design-window", "32"]
    table = run_script(script, [*args, "--json", str(out)], 150)
    assert "| recipe: websockets + redis.asyncio PUB/SUB, `broadcast` |" in table
    assert "| `wsfleet start --broker`, `wsfleet.publish` |" in table
    assert "| 20 | Streams alone |" in table and "| 1 | PUB/SUB plus a stream |" in table
    data = json.loads(out.read_text())
    runs = {run["server"]: run for run in data["deliveries"]}
    assert set(runs) == {"recipe", "wsfleet"}
    # Each host's subscribers, and the publisher on host A, counted by its master.
    assert runs["wsfleet"]["spread"] == [[11], [10]]
    for run in runs.values():
        saturation, latency = run["saturation"], run["latency"]
        assert saturation["deliveries_per_s"] > 1000, run
        # Both hosts' subscribers received (B's across hosts), each message once, in order.
        assert all(saturation["by_group"][host]["deliveries_per_s"] > 0 for host in "AB"), run
        assert saturation["gaps"] == saturation["closed"] == 0, run
        assert saturation["cpu"]["clients"] > 0 and saturation["cpu"]["redis"] > 0, run
        assert latency["rate"] == runs["recipe"]["latency"]["rate"]  # the same for both
        assert latency["gaps"] == latency["closed"] == 0, run
        for host in "AB":
            timed = latency["by_group"][host]
            assert timed["samples"] > 0 and 0 < timed["p50_ms"] <= timed["p99_ms"], run
    assert runs["wsfleet"]["saturation"]["cpu"]["hubs"] > 0
    design = data["design"][0]
    assert {(r["shape"], r["topics"]) for r in design} == {
        (shape, topics) for shape in ("pubsub", "streams") for topics in (1, 20)
    }
    for row in design:
        assert row["saturation"]["messages_per_s"] > 0 and row["saturation"]["gaps"] == 0, row
        timed = row["latency"]
        assert timed["gaps"] == 0 and timed["samples"] > 0, row
        assert 0 < timed["p50_ms"] <= timed["p99_ms"], row
        assert timed["cpu"]["relays"] > 0 and timed["cpu"]["redis"] > 0, row
    for topics in (1, 20):  # both shapes at the same rate
        assert len({r["latency"]["rate"] for r in design if r["topics"] == topics}) == 1


# Import every module of the installed package (not __main__, which runs the command line).
IMPORT_ALL = """
import importlib, pkgutil, wsfleet
for module in pkgutil.walk_packages(wsfleet.__path__, "wsfleet."):
    if module.name != "wsfleet.__main__":
        importlib.import_module(module.name)
        print(module.name)
"""


@pytest.mark.timeout(300)
def test_bench_works_from_a_plain_install(tmp_path: Path) -> None:
    """`wsfleet bench` (URL and memory) from `pip install .` in a fresh virtual environment:
    no extras, so nothing that only the tests and scripts install (psutil, picows)."""
    me = Newcomer(tmp_path, free_port())
    me.clone()
    me.run("python3 -m venv .venv && . .venv/bin/activate && pip install .", 240, activate=False)
    absent = me.run("python -c 'import psutil'", check=False)
    assert "No module named 'psutil'" in absent.stderr, absent.stderr
    # Every installed module imports with wsfleet's dependencies alone: nothing installed
    # needs what only the tests and scripts have (the test harness used to be installed).
    imported = me.run(f"python -c {shlex.quote(IMPORT_ALL)}").stdout.split()
    assert "wsfleet.bench" in imported and "wsfleet.cli" in imported, imported
    assert "wsfleet bench URL" in me.run("wsfleet bench --help").stdout
    worker = me.start("wsfleet worker --port 0 --compression none")
    try:
        port = worker.wait_ready(60)
        url = f"ws://127.0.0.1:{port}/"
        report = json.loads(me.run(f"wsfleet bench {url} -c 2 -k 1 -t 0.5 -p 1 --json").stdout)
        assert report["connected"] == 2 and report["messages"] > 0, report
        assert report["connect_errors"] == {} and report["close_codes"] == {"1000": 2}, report
    finally:
        worker.kill()
    memory = json.loads(me.run("wsfleet bench memory -n 30 --settings 12/5 --json").stdout)
    row = memory["settings"]["12/5"]
    assert row["errors"] == 0 and row["tracemalloc_kib"] > 0 and row["rss_kib"] > 0, row
