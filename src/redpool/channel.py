"""The supervisor's end of a child's pipe: it never blocks, reading or writing.

A child keeps a plain ``multiprocessing`` Connection on its end (blocking, one thread
at a time under its Mailbox's lock).  The supervisor's end is the other half of the
same socket pair in non-blocking mode, with the same framing (a 4-byte big-endian
length, or -1 and an 8-byte one, then the bytes), so that nothing a child does can
hold the loop up:

* Writing: what does not fit in the socket now waits in ``out`` and goes when the
  socket is writable (the loop polls for that while ``out`` holds anything).  A
  blocking ``send_bytes`` of a big batch, to a child itself blocked writing a big
  answer (holding its Mailbox lock, so that its helper thread cannot read either),
  wedged both for ever.
* Reading: ``receive()`` returns the whole messages that have arrived and keeps a
  partial one for later; a blocking ``recv_bytes`` waited for the rest of a message
  that a child killed mid-write, or its forked copy holding the pipe, never sends.
  A message larger than one read (a big result) is read straight into a buffer of its
  exact size, once its header is in: growing a buffer read by read, then copying the
  message out of it, cost the supervisor three times its size and more (a 10 MB
  answer: +50 MB at peak, with the copies on its way to Redis).  Such a message comes
  out as that bytearray, not bytes (its readers slice it with memoryviews).

``eof``: the child's end is gone (every process that had it closed it, or it reset).
"""

from __future__ import annotations

import os
import struct
from collections import deque

HEADER = struct.Struct("!i")
LONG = struct.Struct("!Q")
READ_SIZE = 65536      # one read takes every small message waiting (W1: one per wake-up)
SMALL = 16384          # up to this, header and message go in one write (as Connection)


def frame(msg: bytes) -> tuple[bytes, bytes]:
    n = len(msg)
    return (HEADER.pack(n) if n <= 0x7FFFFFFF else HEADER.pack(-1) + LONG.pack(n)), msg


class Channel:
    __slots__ = ("fd", "inbuf", "out", "closed", "eof", "big", "filled")

    def __init__(self, fd: int) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self.inbuf = bytearray()   # the start of a message not whole yet
        self.out: deque = deque()  # bytes not written yet (memoryviews), in order
        self.closed = False
        self.eof = False
        self.big: bytearray | None = None   # a large message being read, of its full size
        self.filled = 0                     # bytes of it read so far

    def fileno(self) -> int:
        return self.fd

    @property
    def writing(self) -> bool:
        """Something waits to be written (poll for POLLOUT)."""
        return bool(self.out)

    # -- writing -----------------------------------------------------------------------------

    def send(self, msg: bytes) -> None:
        """Queue one message and write what the socket takes now."""
        if self.closed or self.eof:
            return  # its reader is gone: the pool learns of that from the process
        head, body = frame(msg)
        if len(body) <= SMALL:
            self.out.append(memoryview(head + body))
        else:
            self.out.append(memoryview(head))
            self.out.append(memoryview(body))
        self.flush()

    def flush(self) -> None:
        """Write what the socket takes without blocking; keep the rest."""
        out = self.out
        try:
            while out:
                m = out[0]
                n = os.write(self.fd, m)
                if n < len(m):
                    out[0] = m[n:]
                    return   # full: the rest when it is writable
                out.popleft()
        except BlockingIOError:
            pass
        except OSError:      # EPIPE, ECONNRESET: nobody reads the other end any more
            self.eof = True
            out.clear()

    # -- reading -----------------------------------------------------------------------------

    def receive(self, drain: bool = False) -> list[bytes]:
        """The whole messages that have arrived.  One read unless it came back full
        (the poller says when there is more); ``drain``: read until nothing is left
        (the process has exited: what it sent is all there)."""
        msgs: list[bytes] = []
        if self.closed:
            return msgs
        while True:
            if self.big is not None and not self._fill(msgs):
                break
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                break
            except OSError:   # ECONNRESET
                self.eof = True
                break
            if not data:
                self.eof = True
                break
            if self.inbuf:
                self.inbuf += data
                del self.inbuf[:_split(self.inbuf, msgs)]
            elif len(data) >= 4 and HEADER.unpack_from(data)[0] == len(data) - 4:
                msgs.append(data[4:])   # one whole message: the usual case, made quick
            else:
                used = _split(data, msgs)
                if used < len(data):
                    self.inbuf += data[used:]
            if self.inbuf:
                self._start_big()
            if len(data) < READ_SIZE and not drain:
                break
        return msgs

    def _start_big(self) -> None:
        """The partial message in ``inbuf`` is a large one: read the rest of it straight
        into a buffer of its size (see the module's docstring)."""
        buf = self.inbuf
        if len(buf) < 4:
            return
        (n,) = HEADER.unpack_from(buf)
        h = 4
        if n < 0:
            if len(buf) < 12:
                return
            (n,) = LONG.unpack_from(buf, 4)
            h = 12
        if n <= READ_SIZE:
            return
        self.big = bytearray(n)
        self.filled = len(buf) - h
        self.big[:self.filled] = memoryview(buf)[h:]
        self.inbuf = bytearray()

    def _fill(self, msgs: list) -> bool:
        """Read more of the large message; True once it is whole (then in ``msgs``) and
        more may be read, False when the socket has nothing more now."""
        big = self.big
        with memoryview(big) as view:
            while self.filled < len(big):
                try:
                    n = os.readv(self.fd, [view[self.filled:]])
                except BlockingIOError:
                    return False
                except OSError:   # ECONNRESET
                    self.eof = True
                    return False
                if not n:
                    self.eof = True
                    return False
                self.filled += n
        msgs.append(big)
        self.big = None
        self.filled = 0
        return True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.out.clear()
            self.inbuf = bytearray()
            self.big = None
            os.close(self.fd)


def _split(buf, msgs: list[bytes]) -> int:
    """Append the whole messages at the start of ``buf`` (bytes, or the bytearray of a
    message that came in pieces) to ``msgs``; return the number of bytes they took."""
    o, end = 0, len(buf)
    view = memoryview(buf) if isinstance(buf, bytearray) else buf   # one copy, not two
    while end - o >= 4:
        (n,) = HEADER.unpack_from(buf, o)
        h = 4
        if n < 0:
            if end - o < 12:
                break
            (n,) = LONG.unpack_from(buf, o + 4)
            h = 12
        if end - o - h < n:
            break
        msgs.append(bytes(view[o + h:o + h + n]))
        o += h + n
    if view is not buf:
        view.release()   # (before the caller trims the bytearray)
    return o
