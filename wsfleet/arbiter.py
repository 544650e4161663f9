"""Where :class:`BootError` was documented before the master was split into rooms of its own
(wsfleet/fleet.py, processes.py, upgrade.py, master.py): kept so that code which catches
``wsfleet.arbiter.BootError`` around ``wsfleet.run()`` goes on working. It lives in
wsfleet/fleet.py now; nothing in wsfleet imports this module."""

from __future__ import annotations

from .fleet import BootError

__all__ = ["BootError"]
