"""A TCP proxy in front of a Redis server that loses one reply: it forwards a command
containing ``trigger`` to the server (which runs it), then closes both connections
without passing the reply on -- a connection lost after sending, as a network fault or
a failover does it.  Other connections, and everything else, pass through."""

from __future__ import annotations

import socket
import threading


class DropProxy:
    def __init__(self, port: int, trigger: bytes = b"LPUSH", times: int = 1) -> None:
        self.target = ("127.0.0.1", port)
        self.trigger, self.times = trigger, times
        self.dropped = 0
        self._lock = threading.Lock()
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(16)
        self.port = self._srv.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            state = {"dropping": False}
            threading.Thread(target=self._up, args=(client, upstream, state), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, state), daemon=True).start()

    def _up(self, client, upstream, state) -> None:
        try:
            while data := client.recv(65536):
                drop = False
                with self._lock:
                    if self.trigger in data and self.dropped < self.times:
                        self.dropped += 1
                        drop = state["dropping"] = True
                upstream.sendall(data)
                if drop:
                    # (the server runs it; its reply is swallowed by _down) then both go
                    threading.Event().wait(0.3)
                    break
        except OSError:
            pass
        for s in (client, upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _down(self, upstream, client, state) -> None:
        try:
            while data := upstream.recv(65536):
                if not state["dropping"]:
                    client.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self._closed = True
        self._srv.close()
