"""ZeroMQ IO of a worker leader (TP rank 0 of a prefill or decode worker).

- control: a PULL socket bound at --control_addr; the router and (for a decode leader) its
  prefill peers push here. Only messages signed with the fleet key and within every field's bounds
  are accepted (protocol.decode); anything else is logged and dropped.
- events: a PUSH connected to the router's events address (TokenEvent(s), Reserved, Busy,
  RequestError, WorkerStatus).
- peers: PUSH sockets to other worker leaders, connected lazily by address.
Sends never block the step loop: a full peer queue raises instead of hanging (SNDTIMEO).
"""

from __future__ import annotations

import logging
import os
import time

import zmq

from glmserve.shared import protocol

log = logging.getLogger(__name__)

# Sent in every WorkerStatus: a new value under the same worker id means the process restarted
# (supervisord), so the router ends or re-runs what the old process held at once.
PROCESS_INSTANCE = f"{os.getpid()}-{time.time_ns()}"


class WorkerIO:
    def __init__(self, control_addr: str, router_addr: str):
        self.ctx = zmq.Context.instance()
        self.control = self.ctx.socket(zmq.PULL)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_FRAME_BYTES)
        self.control.bind(control_addr)
        self.events = self._push(router_addr)
        self._peers: dict[str, zmq.Socket] = {}
        self.poller = zmq.Poller()
        self.poller.register(self.control, zmq.POLLIN)

    def _push(self, addr: str) -> zmq.Socket:
        s = self.ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 2000)
        s.setsockopt(zmq.SNDHWM, 100000)
        s.setsockopt(zmq.SNDTIMEO, 5000)
        s.connect(addr)
        return s

    def recv(self, timeout_ms: int) -> list[protocol.Msg]:
        """Every message waiting now (waits up to timeout_ms for the first one)."""
        out: list[protocol.Msg] = []
        if not self.poller.poll(timeout_ms):
            return out
        while True:
            try:
                data = self.control.recv(zmq.NOBLOCK)
            except zmq.Again:
                return out
            try:
                out.append(protocol.decode(data))
            except protocol.ProtocolError as e:
                log.warning("dropped a bad control message: %s", e)

    def to_router(self, msg: protocol.Msg) -> None:
        self.events.send(protocol.encode(msg))

    def tokens_to_router(self, events: list[protocol.TokenEvent]) -> None:
        """A step's TokenEvents, in order: one TokenEvents frame per MAX_BATCHED_EVENTS (one event
        alone goes as itself)."""
        if len(events) == 1:
            self.to_router(events[0])
            return
        for i in range(0, len(events), protocol.MAX_BATCHED_EVENTS):
            self.to_router(protocol.TokenEvents(events=events[i: i + protocol.MAX_BATCHED_EVENTS]))

    def to_peer(self, addr: str, msg: protocol.Msg) -> None:
        sock = self._peers.get(addr)
        if sock is None:
            sock = self._peers[addr] = self._push(addr)
        sock.send(protocol.encode(msg))

    def close(self) -> None:
        for s in [self.control, self.events, *self._peers.values()]:
            s.close(linger=0)
