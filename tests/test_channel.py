"""channel.Channel, the supervisor's end of a child's pipe: the framing of
multiprocessing.Connection (which the child keeps), and never a blocking call."""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest

from redpool.channel import Channel
from redpool.poller import Poller
from multiprocessing.connection import Connection


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    chan, conn = Channel(ours.detach()), Connection(theirs.detach())
    yield chan, conn
    chan.close()
    conn.close()


def test_messages_arrive_whole_however_the_bytes_come(pair):
    chan, conn = pair
    msgs = [b"", b"R", b"x" * 70_000, bytes(range(256)) * 3]
    framed = b"".join(struct.pack("!i", len(m)) + m for m in msgs)
    got = []
    for i in range(0, len(framed), 7):        # seven bytes at a time: headers split too
        os.write(conn.fileno(), framed[i:i + 7])
        got += chan.receive(drain=True)
    assert got == msgs and not chan.eof


def test_what_connection_sends_channel_reads_and_back(pair):
    chan, conn = pair
    conn.send_bytes(b"D" * 100)
    conn.send_bytes(b"M" * 20_000)
    assert chan.receive(drain=True) == [b"D" * 100, b"M" * 20_000]
    chan.send(b"B" * 10)
    assert conn.recv_bytes() == b"B" * 10


def test_a_message_bigger_than_the_pipe_never_blocks_the_sender(pair):
    chan, conn = pair
    big = os.urandom(3 << 20)
    # Given nobody reading: send returns at once, with the rest waiting to be written
    chan.send(big)
    chan.send(b"after")
    assert chan.writing
    # Then, as the other end reads, flush() writes the rest, in order
    got = []
    reader = threading.Thread(target=lambda: got.extend([conn.recv_bytes(), conn.recv_bytes()]))
    reader.start()
    poller = Poller()
    while chan.writing:
        assert poller.wait([chan], 30, [chan]) == [chan], "never writable"
        chan.flush()
    reader.join(30)
    assert got == [big, b"after"]


def test_the_other_end_closing_is_eof_after_what_it_sent(pair):
    chan, conn = pair
    conn.send_bytes(b"last words")
    os.write(conn.fileno(), struct.pack("!i", 50) + b"cut short")   # never finished
    conn.close()
    assert chan.receive(drain=True) == [b"last words"]
    assert chan.eof
    chan.send(b"to nobody")   # no error, nothing kept
    assert not chan.writing


def test_a_send_to_a_closed_end_says_eof(pair):
    chan, conn = pair
    conn.close()
    chan.send(b"x" * 100)
    assert chan.eof and not chan.writing
