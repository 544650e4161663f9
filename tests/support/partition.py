"""A TCP relay between one host and Redis that a test can partition: what a network cut
between a host and Redis does, on 127.0.0.1, without touching the machine's firewall.

:meth:`Relay.partition` stops the traffic both ways without closing anything, as a cable
pulled or a firewall dropping packets does: what is sent stays in the sockets' buffers, new
connections are accepted by the kernel but reach nobody, and nobody is told. :meth:`heal`
lets the traffic go on where it stopped (a short cut, which TCP retransmission rides out);
``heal(reset=True)`` resets every connection made before it instead (a cut that lasted
until TCP gave up, or a firewall that answers with resets once it is lifted).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

from .harness import free_port


class Relay:
    """Listens on a free port of 127.0.0.1 and relays each connection to ``port``."""

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.port = free_port()
        self.flowing = threading.Event()
        self.flowing.set()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.closed = False
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def partition(self) -> None:
        self.flowing.clear()

    def heal(self, reset: bool = False) -> None:
        if reset:
            with self.lock:
                old, self.sockets = self.sockets, []
            for sock in old:
                _reset(sock)
        self.flowing.set()

    def close(self) -> None:
        self.closed = True
        self.flowing.set()
        self.listener.close()
        with self.lock:
            old, self.sockets = self.sockets, []
        for sock in old:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._open, args=(client,), daemon=True).start()

    def _open(self, client: socket.socket) -> None:
        self._keep(client)
        self.flowing.wait()  # (partitioned: the connection is accepted, nothing answers)
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self._keep(upstream)
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _keep(self, sock: socket.socket) -> None:
        with self.lock:
            self.sockets.append(sock)

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        """Copy one way; while partitioned, hold what was read (and leave the rest in the
        kernel's buffers) until healed."""
        try:
            while True:
                self.flowing.wait()
                data = source.recv(65536)
                if not data:
                    break
                self.flowing.wait()
                if self.closed:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _reset(sock: socket.socket) -> None:
    """Close with a reset (RST), as a peer that forgot the connection answers."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RD)  # (wakes the thread reading it; sends nothing)
    sock.close()
