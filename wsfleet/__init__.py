"""wsfleet: a process manager for WebSocket servers built on the websockets library."""

__version__ = "0.1.0"
