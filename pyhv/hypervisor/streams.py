"""Paging services and the streams they hold: placing a partition's stream
on a service, failover when one dies or hangs, and controlled shutdown.

Each stream's state lives in pyhv.stream.Stream; here is what moves it.
The engine sends page-ins (READs) on the service's fast channel while the
stream flows (_stream_changed keeps it told); everything else goes on the
stream socket from Python.  Fencing: before a stream leaves a service that
failed, that process is killed and reaped, so it can never complete an old
write after the other service has written a newer one; the engine takes
back the READs that were in flight there and sends them again where the
stream goes next.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time

from pyhv import claim, wire
from pyhv.stream import ABORTED, COMPLETED, ENABLED, FLOWING, INVALID, RESUMED, SUSPENDED, \
    SUSPENDING, Request, ServiceLink, Stream  # fmt: skip

log = logging.getLogger("pyhv.hypervisor")

RETRY_PATH_S = 1.0  # while no path to a device works, each is tried again this often
RETRY_PATH_FIRST_S = 0.1  # ... the first time (a server restarted, a connection reset)
#: An OPEN that fails so waits for a path; any other failure (an export now
#: too small, a key the server refuses) is the device's, and is said once.
PATH_ERRORS = {errno.ENOTCONN, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT,
               errno.ECONNREFUSED, errno.ECONNRESET, errno.ESHUTDOWN, errno.EPIPE}


class PagingServices:
    """Mixed into the Hypervisor: services, streams, failover, shutdown."""

    def _stream_changed(self, stream: Stream) -> None:
        """Tell the engine where the partition's READs go now, and whether
        they may go (the stream flows)."""
        part = self.by_index.get(stream.index)
        if part is None or part.eng is None:
            return
        svc = stream.service
        chan = svc.chan if svc is not None else None
        self.engine.stream_bind(part.eng, chan, stream.state in FLOWING and chan is not None)

    def stream_inflight(self, stream: Stream) -> int:
        """Requests of the stream in flight: Python's, and the engine's READs."""
        part = self.by_index.get(stream.index)
        reads = self.engine.stats(part.eng)["reads_inflight"] if part and part.eng else 0
        return len(stream.inflight) + reads

    def place(self, stream: Stream, avoid: ServiceLink | None = None) -> None:
        """Give a stream without a service the first running one it may use."""
        if stream.service is not None or self.stopping or stream.closing is not None:
            return
        if stream.fenced:
            log.error("partition %s: its device %s is claimed by another system: its paging "
                      "stays stopped", stream.name, stream.device_spec["id"])  # fmt: skip
            stream.set_state(SUSPENDED)
            return
        if self.held_back(stream):  # its claim first
            stream.path_wait = True
            if stream.state != SUSPENDED:
                stream.set_state(SUSPENDED)
            self.later(RETRY_PATH_S, lambda: self._retry_paths(stream))
            return
        for name in stream.paging:
            svc = self.services[name]
            if svc.running and svc is not avoid and name not in stream.open_failed:
                self.bind(stream, svc)
                return
        if stream.path_wait:  # no path works: faults wait, every path is tried again
            if stream.state != SUSPENDED:
                log.warning("partition %s: no path to device %s works; its faults wait",
                            stream.name, stream.device_spec["id"])  # fmt: skip
                stream.set_state(SUSPENDED)
            first = stream.path_retries == 0
            stream.path_retries += 1
            self.later(RETRY_PATH_FIRST_S if first else RETRY_PATH_S,
                       lambda: self._retry_paths(stream))  # fmt: skip
            return
        log.warning("partition %s: no paging service of %s is running; paging waits",
                    stream.name, ", ".join(stream.paging))  # fmt: skip

    def check_claims(self) -> None:
        """Devices on NBD servers: a system fences itself.  One whose claim
        another system took is never paged to again; one whose claim has
        not been renewed lately is not paged to until it is (pyhv.claim)."""
        lost, stale = set(self.claims.lost()), set(self.claims.stale())
        if not lost and not stale:
            return
        for part in self.partitions:
            stream, dev_id = part.stream, part.device.id
            if dev_id in lost and not stream.fenced:
                stream.fenced = True
                stream.path_wait = True  # (io_timeout applies to the faults that wait)
                if stream.service is not None:
                    self.path_lost(stream, stream.service, "its claim was taken by another system")
                else:
                    stream.set_state(SUSPENDED)
            elif dev_id in stale and stream.service is not None and stream.state in FLOWING:
                self.path_lost(stream, stream.service, "its claim could not be renewed")

    def _retry_paths(self, stream: Stream) -> None:
        if stream.service is None and stream.path_wait and not self.stopping and (
                self.by_index.get(stream.index) is not None):  # fmt: skip
            stream.open_failed.clear()
            self.place(stream)

    def path_lost(self, stream: Stream, svc: ServiceLink, why: str) -> None:
        """svc answered that it lost its path to the stream's device (NBD,
        ENOTCONN): the service is well, the path is not.  The stream moves,
        with every request it had in flight, to its other service's path;
        with none working it is SUSPENDED (faults wait) and every path is
        tried again each RETRY_PATH_S.  No page is lost and none is a
        machine check (io_timeout aside).

        Fencing without a kill (the service keeps its other streams): the
        stream goes elsewhere only once svc has answered CLOSE, which it
        does after everything of the stream in flight there has ended, so
        that nothing of the old tenure (a READ's clean-up, a WRITE's punch)
        can touch pages the next service works on.  If svc does not answer,
        its timeout fences it the usual way (service_failed)."""
        if stream.service is not svc or self.stopping:
            return
        log.error("partition %s: paging service %s lost its path to device %s: %s",
                  stream.name, svc.name, stream.device_spec["id"], why)  # fmt: skip
        detected = time.monotonic()
        n = len(stream.take_back())
        stream.service = None
        stream.paths_lost += 1
        stream.path_wait = True
        stream.path_retries = 0
        stream.mark_failover(svc.name, n, detected)
        stream.open_failed.add(svc.name)  # (its path is tried again after the others)
        stream.set_state(ABORTED if stream.state != SUSPENDED else SUSPENDED)
        stream.closing = svc

        def closed(status, count, data):
            if stream.closing is svc:
                stream.closing = None
                self.place(stream)

        svc.send(stream, Request(wire.OP_CLOSE, 0, 0, None, closed, control=True))

    def held_back(self, stream: Stream) -> bool:
        """May this stream not go to any service now?  Its old service has
        not answered CLOSE yet, or its device's claim is lost or stale (a
        system fences itself: pyhv.claim)."""
        if stream.closing is not None or stream.fenced:
            return True
        dev_id = stream.device_spec["id"]
        return stream.device_spec["kind"] == "nbd" and (
            dev_id in self.claims.stale() or dev_id in self.claims.lost())  # fmt: skip

    def bind(self, stream: Stream, svc: ServiceLink) -> None:
        """Open the partition's device on svc; the stream flows once it is open."""
        if self.held_back(stream):  # (every way to a service goes through place's gates)
            self.place(stream)
            return
        if not svc.running:
            self.place(stream, avoid=svc)
            return
        stream.service = svc
        stream.bound_to(svc)

        def opened(status, count, data):
            if stream.service is not svc:
                return
            if status:
                log.error("partition %s: paging service %s cannot open device %s: %s",
                          stream.name, svc.name, stream.device_spec["id"],
                          os.strerror(-status))  # fmt: skip
                stream.service = None
                if (stream.device_spec["kind"] == "nbd" and stream.state != INVALID
                        and -status in PATH_ERRORS):  # (not at start: `up` says why and stops)
                    stream.path_wait = True
                if not stream.path_wait:
                    stream.set_state(ABORTED)
                stream.open_failed.add(svc.name)
                self.place(stream)
                return
            stream.open_failed.clear()
            stream.path_wait = False
            if stream.state == SUSPENDING:  # stopped while it opened: it stays stopped
                return
            stream.set_state(ENABLED if stream.state == INVALID else RESUMED)
            if stream.paths_lost:
                stream.failover_done()  # (page-ins flow again: nothing else may ask soon)
            stream.pump()

        spec = dict(stream.device_spec)
        spec["path"] = spec.pop("paths", {}).get(svc.name, spec["path"])
        if spec["kind"] == "nbd":  # a command unanswered this long: the path is lost
            spec["path_timeout"] = min(svc.cfg.timeout / 2, claim.MAX_PATH_DEADLINE)
        svc.send(stream, Request(wire.OP_OPEN, 0, 0, json.dumps(spec).encode(), opened,
                                 control=True, fds=[stream.memfd]))  # fmt: skip

    def service_failed(self, svc: ServiceLink, why: str) -> None:
        """A service died, closed its socket or stopped answering: fence it,
        move its streams, with every request they had in flight, to their
        other service, and restart it if its config says so."""
        if svc.sock is None:
            return
        log.error("paging service %s: failed: %s", svc.name, why)
        detected = time.monotonic()  # failover time counts from here, fencing included
        streams = svc.streams()
        svc.close(kill=True)  # fencing: it can never complete an old write later
        self.closed_without_answer(svc)
        if svc.state == "stopping" or self.stopping:
            svc.state = "stopped"
        else:
            svc.state = "dead"
            svc.deaths += 1
        for stream in streams:
            n = len(stream.take_back())
            stream.service = None
            stream.set_state(ABORTED)
            stream.mark_failover(svc.name, n, detected)
            self.place(stream)
        if svc.state == "dead" and svc.cfg.restart and not self.stopping:
            log.info("paging service %s: restarting (restart = true)", svc.name)
            self.start_service(svc)

    def closed_without_answer(self, svc: ServiceLink) -> None:
        """svc is gone (fenced, or stopped): a CLOSE it had not answered after
        a lost path never will be; nothing of it runs any more."""
        for stream in self.streams():
            if stream.closing is svc:
                stream.closing = None
                self.place(stream)

    def start_service(self, svc: ServiceLink) -> None:
        svc.start()
        for stream in self.streams():
            if stream.service is None and svc.name in stream.paging:
                self.bind(stream, svc)

    def suspend(self, stream: Stream, final_state: str, then) -> None:
        """Controlled end of a stream on its service: no new request goes
        out, the ones in flight complete, writes are flushed and synced; then
        the stream is `final_state` (SUSPENDED or COMPLETED), holds no
        service, and then() runs.  If the service fails meanwhile, the
        stream has failed over already, and then() just runs."""
        svc = stream.service
        stream.set_state(SUSPENDING)
        flushed = [False]

        def on_flush(status, count, data):
            if status:
                log.error("partition %s: flush on %s failed: %s", stream.name, svc.name,
                          os.strerror(-status))  # fmt: skip
            flushed[0] = True

        def finish():
            if stream.service is svc:
                stream.take_back()  # nothing is in flight; never strand a request
                stream.service = None
                stream.set_state(final_state)
            then()

        def drained():
            if stream.service is svc:  # FLUSH is not resent elsewhere: it is this service's
                svc.send(stream, Request(wire.OP_FLUSH, 0, 0, None, on_flush, control=True))
            self.after(lambda: flushed[0] or stream.service is not svc, finish)

        self.after(lambda: not self.stream_inflight(stream) or stream.service is not svc,
                   drained)  # fmt: skip

    def stop_service(self, svc: ServiceLink, final: bool = False, then=None) -> None:
        """Controlled shutdown of a paging service (see `suspend`); each of
        its streams moves to the partition's other service if one runs, and
        only then does the service exit."""
        svc.state = "stopping"
        streams = svc.streams()
        left = [len(streams)]

        def one_done(stream=None):
            if stream is not None and not final:
                self.place(stream, avoid=svc)
            left[0] -= 1
            if left[0] <= 0:
                if svc.sock is not None:
                    svc.close(kill=False)
                self.closed_without_answer(svc)
                svc.state = "stopped"
                log.info("paging service %s: stopped", svc.name)
                if then:  # once the streams that moved flow again on their other service
                    self.after(lambda: all(s.service is None or s.state in FLOWING
                                           or s.state == ABORTED for s in streams), then)

        if not streams:
            one_done()
        for stream in streams:
            self.suspend(stream, COMPLETED if final else SUSPENDED,
                         lambda stream=stream: one_done(stream))  # fmt: skip
