"""Support for the tests and for ``scripts/``: no tests here, and not part of the package.

- :mod:`.harness`: running wsfleet (processes, a master, supervisord, headless Chromium);
  the tests and the scripts share it.
- :mod:`.loadtest`: a load that records every connection's outcome; tests and
  ``scripts/bench-restart``.
- :mod:`.helpers`: what several test modules share (running a command, a test's master, the
  apps they serve); the fixtures are in ``tests/conftest.py``.
- :mod:`.wire`: a raw WebSocket client, for what client libraries refuse to send.
- :mod:`.pubsub_bench`: the pub/sub benchmarks' raw clients and measurements
  (``scripts/bench-pubsub``, ``scripts/bench-broker``).
- :mod:`.redis`: a throwaway ``redis-server`` (the --broker tests, ``scripts/bench-broker``).
- :mod:`.newcomer`: a user's terminal with a fresh virtual environment.

The scripts run from a checkout put its root first on ``sys.path`` and import
``tests.support.harness``; nothing needs installing beyond the bench extra.
"""
