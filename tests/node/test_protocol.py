"""The sans-IO migration machines, paired in memory (no files, sockets or delta engine).

A toy glue plays both sides: frames are ``offset || data``, the receiver's
"Rebuilder" is a bytearray plus a persisted set of pending ranges, and the
"image index" is whatever the receiver already holds. That is enough to drive
every transition: cold, warm, resume after a cut, and hostile senders.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

import pytest

from dwcp.delta.manifest import content_id_of
from dwcp.errors import (
    AuthenticationError,
    ConnectionLostError,
    IntegrityError,
    ProtocolError,
    RemoteError,
)
from dwcp.identity import NodeKey
from dwcp.migrate import messages as m
from dwcp.migrate import protocol as p

BLOCK = 4096


SUMMARY = b"toy-summary"


def make_offer(key: NodeKey, image: bytes, name: str = "vm.img", tid: str | None = None) -> m.Offer:
    root = hashlib.sha256(b"content" + image).digest()[:16]  # opaque to the protocol
    blocks = -(-len(image) // BLOCK)
    groups = -(-blocks // 256)
    cid = content_id_of(len(image), BLOCK, blocks, root)
    tid = tid or p.transfer_id_for(key.public.raw, name, cid, len(image))
    fields = (tid, name, len(image), BLOCK, blocks, 1, groups, root, cid)
    tail = (hashlib.sha256(SUMMARY).digest(), m.REFUSE, bytes(16), "")
    unsigned = m.Offer(*fields, *tail, bytes(64))
    return m.Offer(*fields, *tail, key.sign(unsigned.signing_payload()))


def part(tid: str, kind: int, data: bytes = b"", last: bool = True) -> p.MessageReceived:
    return p.MessageReceived(m.Part(tid, kind, last, data))


def ranges_part(tid: str, ranges: list[tuple[int, int]]) -> p.MessageReceived:
    return part(tid, m.RANGES, m.pack_ranges(ranges))


def finished(key: NodeKey, tid: str, image: bytes, frames: int, wire: int) -> p.StreamFinished:
    sha = hashlib.sha256(image).digest()
    return p.StreamFinished(frames, wire, sha, key.sign(m.done_signing_payload(tid, sha)))


@dataclass
class ToyDestination:
    """A receiver's disk: stored images and partial transfers (survives 'restarts')."""

    known: bytes = b""  # an older image it holds (the 'index')
    partial: dict[str, tuple[bytearray, set[int]]] = field(default_factory=dict)
    stored: dict[str, bytes] = field(default_factory=dict)


class Pair:
    """Drives a Sender and a Receiver until both stop; can cut the link after N frames."""

    def __init__(self, image: bytes, dest: ToyDestination, *, key: NodeKey | None = None) -> None:
        self.image = image
        self.dest = dest
        self.key = key or NodeKey.generate()
        self.trusted = self.key.public
        self.sender = p.Sender(make_offer(self.key, image))
        self.receiver = p.Receiver(self.trusted, max_image_bytes=1 << 30)
        self.to_receiver: list[p.Event] = []
        self.to_sender: list[p.Event] = []
        self.sender_done: list[p.Action] = []
        self.receiver_done: list[p.Action] = []
        self.frames_sent = 0  # frames the receiver applied
        self.cut_after: int | None = None
        self.tamper = False
        self.extra_frames = 0
        self.offer = self.sender.offer

    # sender glue
    def run_sender(self, actions: list[p.Action]) -> None:
        for a in actions:
            tid = self.sender.transfer_id
            if isinstance(a, p.SendMessage):
                self.to_receiver.append(p.MessageReceived(m.decode(m.encode(a.message))))
            elif isinstance(a, p.SendSummary):
                self.to_receiver.append(part(tid, m.SUMMARY, SUMMARY))
            elif isinstance(a, p.ProvideLeaves):
                assert a.runs == ((0, 1),)
                self.to_receiver.append(part(tid, m.LEAVES, b"toy-leaves"))
                self.run_sender(self.sender.handle(p.LeavesSent()))
            elif isinstance(a, p.StreamRanges):
                frames, wire = 0, 0
                pairs = [(a.ranges[i], a.ranges[i + 1]) for i in range(0, len(a.ranges), 2)]
                for off, n in pairs:
                    for o in range(off, off + n, BLOCK):
                        data = self.image[o : min(o + BLOCK, off + n)]
                        if self.tamper:
                            data = bytes(b ^ 1 for b in data)
                        frame = struct.pack("<Q", o) + data
                        self.to_receiver.append(p.FrameReceived(frame))
                        frames += 1
                        wire += len(frame)
                for _ in range(self.extra_frames):
                    self.to_receiver.append(p.FrameReceived(b"\0" * 8 + b"x"))
                done = finished(self.key, self.sender.transfer_id, self.image, frames, wire)
                self.run_sender(self.sender.handle(done))
            else:
                self.sender_done.append(a)

    def cut(self) -> None:
        self.run_sender(self.sender.handle(p.ConnectionLost("cut")))
        self.run_receiver(self.receiver.handle(p.ConnectionLost("cut")))
        self.to_receiver.clear()
        self.to_sender.clear()

    # receiver glue
    def run_receiver(self, actions: list[p.Action]) -> None:
        for a in actions:
            if isinstance(a, p.SendMessage):
                self.to_sender.append(p.MessageReceived(m.decode(m.encode(a.message))))
            elif isinstance(a, p.PrepareTransfer):
                self.offer = a.offer
                self.run_receiver(self.receiver.handle(p.Admitted()))
            elif isinstance(a, p.FeedSummary):
                assert a.data == SUMMARY and a.last
                self.run_receiver(self.receiver.handle(p.SummaryFed(True, 1)))
            elif isinstance(a, p.SendNeed):
                need = m.Part(self.receiver.transfer_id, m.NEED, True, m.pack_ranges([(0, 1)]))
                self.to_sender.append(p.MessageReceived(need))
            elif isinstance(a, p.FeedLeaves):
                assert a.data == b"toy-leaves" and a.last
                self.run_receiver(self.receiver.handle(p.LeavesFed(True)))
            elif isinstance(a, p.ExpectFrames):
                pass
            elif isinstance(a, p.AssembleManifest):
                tid = self.offer.transfer_id
                size = self.offer.size
                if tid not in self.dest.partial:
                    buf = bytearray(size)
                    pending = set()
                    for o in range(0, size, BLOCK):
                        have = self.dest.known[o : o + BLOCK]
                        if have == self.image[o : o + BLOCK]:
                            buf[o : o + len(have)] = have
                        else:
                            pending.add(o)
                    self.dest.partial[tid] = (buf, pending)
                buf, pending = self.dest.partial[tid]
                missing = tuple((o, min(BLOCK, size - o)) for o in sorted(pending))
                n = sum(x for _, x in missing)
                self.run_receiver(self.receiver.handle(p.Prepared(missing, n, size - n, 0)))
            elif isinstance(a, p.WriteFrame):
                (off,) = struct.unpack_from("<Q", a.frame)
                data = a.frame[8:]
                buf, pending = self.dest.partial[self.receiver.transfer_id]
                buf[off : off + len(data)] = data
                pending.discard(off)
                self.frames_sent += 1
                self.run_receiver(self.receiver.handle(p.FrameWritten(len(data))))
            elif isinstance(a, p.FinishTransfer):
                tid = self.receiver.transfer_id
                buf, pending = self.dest.partial[tid]
                sha = hashlib.sha256(buf).digest()
                assert self.receiver.offer is not None
                if pending or sha != a.sha256:
                    ev: p.Event = p.LocalFailure("integrity", "digest mismatch", discard=True)
                else:
                    self.dest.stored[self.receiver.offer.name] = bytes(buf)
                    del self.dest.partial[tid]
                    ev = p.Finished(sha, self.receiver.offer.name)
                self.run_receiver(self.receiver.handle(ev))
            else:
                if isinstance(a, p.Failed) and a.discard:
                    self.dest.partial.pop(self.receiver.transfer_id, None)
                self.receiver_done.append(a)

    def run(self, max_rounds: int = 100_000) -> None:
        self.run_sender(self.sender.handle(p.Start()))
        for _ in range(max_rounds):
            if not self.to_receiver and not self.to_sender:
                return
            if self.cut_after is not None and self.frames_sent >= self.cut_after:
                self.cut()
                return
            if self.to_receiver:
                self.run_receiver(self.receiver.handle(self.to_receiver.pop(0)))
            if self.to_sender:
                self.run_sender(self.sender.handle(self.to_sender.pop(0)))
        raise AssertionError("no progress")


def image_of(n_blocks: int, seed: int) -> bytes:
    return b"".join(
        hashlib.sha256(bytes([seed]) + i.to_bytes(4, "little")).digest() * 128
        for i in range(n_blocks)
    )


def test_cold_migration() -> None:
    image = image_of(32, 1)
    dest = ToyDestination()
    pair = Pair(image, dest)
    pair.run()
    assert dest.stored["vm.img"] == image
    assert (
        pair.sender.state is p.MigrationState.COMPLETE
        and pair.receiver.state is p.MigrationState.COMPLETE
    )
    assert isinstance(pair.sender_done[-1], p.Completed)
    assert pair.sender.stats.bytes_missing == len(image)


def test_warm_migration_sends_only_changes() -> None:
    old = image_of(32, 1)
    new = bytearray(old)
    new[5 * BLOCK : 5 * BLOCK + 10] = b"x" * 10
    pair = Pair(bytes(new), ToyDestination(known=old))
    pair.run()
    assert pair.dest.stored["vm.img"] == bytes(new)
    assert pair.sender.stats.bytes_missing == BLOCK
    assert pair.frames_sent == 1


def test_resume_after_cut_is_identical() -> None:
    image = image_of(40, 2)
    dest = ToyDestination()
    key = NodeKey.generate()
    first = Pair(image, dest, key=key)
    first.cut_after = 15
    first.run()
    assert isinstance(first.sender_done[-1], p.Failed)
    assert isinstance(first.sender_done[-1].error, ConnectionLostError)
    assert not first.receiver_done[-1].discard  # type: ignore[attr-defined]
    assert dest.stored == {} and len(dest.partial) == 1
    second = Pair(image, dest, key=key)  # same sender key and image: same transfer id
    second.run()
    assert dest.stored["vm.img"] == image
    assert second.frames_sent == 40 - 15
    assert dest.partial == {}


def test_tampered_data_is_rejected_and_discarded() -> None:
    pair = Pair(image_of(8, 3), ToyDestination())
    pair.tamper = True
    pair.run()
    assert pair.dest.stored == {} and pair.dest.partial == {}
    err = pair.sender.error
    assert isinstance(err, RemoteError) and err.code == "integrity"
    assert isinstance(pair.receiver.error, IntegrityError)


def test_untrusted_signature_is_refused() -> None:
    pair = Pair(image_of(4, 4), ToyDestination())
    pair.receiver = p.Receiver(NodeKey.generate().public, max_image_bytes=1 << 30)
    pair.run()
    assert isinstance(pair.receiver.error, AuthenticationError)
    assert isinstance(pair.sender.error, RemoteError) and pair.sender.error.code == "refused"
    assert pair.dest.partial == {}


def test_too_many_frames_is_a_protocol_error() -> None:
    pair = Pair(image_of(4, 5), ToyDestination())
    pair.extra_frames = 2000
    pair.run()
    assert isinstance(pair.receiver.error, ProtocolError)
    assert pair.dest.stored == {}


def test_too_large_image_refused() -> None:
    pair = Pair(image_of(4, 6), ToyDestination())
    pair.receiver = p.Receiver(pair.trusted, max_image_bytes=100)
    pair.run()
    assert isinstance(pair.sender.error, RemoteError) and pair.sender.error.code == "too_large"


def test_forged_transfer_id_is_a_protocol_error() -> None:
    key = NodeKey.generate()
    offer = make_offer(key, image_of(2, 7), tid="0" * 32)
    r = p.Receiver(key.public, max_image_bytes=1 << 30)
    actions = r.handle(p.MessageReceived(offer))
    assert isinstance(actions[0], p.SendMessage) and isinstance(actions[0].message, m.Error)
    assert isinstance(r.error, ProtocolError)


def test_unexpected_message_names_state() -> None:
    s = p.Sender(make_offer(NodeKey.generate(), b"x" * 10))
    s.handle(p.Start())
    actions = s.handle(p.MessageReceived(m.Ack(s.transfer_id, b"h" * 32, "x")))
    assert isinstance(actions[-1], p.Failed)
    assert "Ack not allowed in state offered" in str(actions[-1].error)


def test_leaves_asked_twice_is_a_protocol_error() -> None:
    s = p.Sender(make_offer(NodeKey.generate(), b"x" * 10))
    s.handle(p.Start())
    need = m.pack_ranges([(0, 1)])
    assert s.handle(part(s.transfer_id, m.NEED, need)) == [p.ProvideLeaves(((0, 1),))]
    s.handle(p.LeavesSent())
    actions = s.handle(part(s.transfer_id, m.NEED, need))
    assert isinstance(actions[-1], p.Failed) and isinstance(actions[-1].error, ProtocolError)


def test_plan_beyond_image_is_refused() -> None:
    s = p.Sender(make_offer(NodeKey.generate(), b"x" * 10))
    s.handle(p.Start())
    assert s.handle(p.MessageReceived(m.PlanHeader(s.transfer_id, 10, 0, 0, 10))) == []
    actions = s.handle(ranges_part(s.transfer_id, [(0, 4096)]))
    assert isinstance(actions[-1], p.Failed)
    assert "beyond the end" in str(actions[-1].error)


def test_done_before_last_frame_waits() -> None:
    """Done may overtake the bulk data; the receiver finishes only after every frame."""
    key = NodeKey.generate()
    offer = make_offer(key, b"y" * 8192)
    r = p.Receiver(key.public, max_image_bytes=1 << 30)
    assert isinstance(r.handle(p.MessageReceived(offer))[0], p.PrepareTransfer)
    assert r.handle(p.Admitted()) == []
    assert r.handle(part(r.transfer_id, m.SUMMARY, SUMMARY)) == [p.FeedSummary(SUMMARY, True)]
    assert r.handle(p.SummaryFed(True, 0)) == [p.AssembleManifest()]
    out = r.handle(p.Prepared(((0, 8192),), 8192, 0, 0))
    assert isinstance(out[0], p.SendMessage) and isinstance(out[0].message, m.PlanHeader)
    assert out[-1] == p.ExpectFrames()
    assert r.handle(p.FrameReceived(b"a" * 100)) == [p.WriteFrame(b"a" * 100)]
    sha = hashlib.sha256(b"y" * 8192).digest()
    sig = key.sign(m.done_signing_payload(r.transfer_id, sha))
    assert r.handle(p.MessageReceived(m.Done(r.transfer_id, 2, 200, sha, sig))) == []
    assert r.handle(p.FrameWritten(4096)) == []
    assert r.handle(p.FrameReceived(b"b" * 100)) == [p.WriteFrame(b"b" * 100)]
    assert r.handle(p.FrameWritten(4096)) == [p.FinishTransfer(sha)]


def test_done_with_a_bad_signature_is_refused() -> None:
    key = NodeKey.generate()
    offer = make_offer(key, b"y" * 4096)
    r = p.Receiver(key.public, max_image_bytes=1 << 30)
    r.handle(p.MessageReceived(offer))
    r.handle(p.Admitted())
    r.handle(part(r.transfer_id, m.SUMMARY, SUMMARY))
    r.handle(p.SummaryFed(True, 0))
    r.handle(p.Prepared(((0, 4096),), 4096, 0, 0))
    sha = hashlib.sha256(b"y" * 4096).digest()
    forged = NodeKey.generate().sign(m.done_signing_payload(r.transfer_id, sha))
    actions = r.handle(p.MessageReceived(m.Done(r.transfer_id, 1, 100, sha, forged)))
    assert isinstance(actions[0], p.SendMessage) and actions[0].message.code == "refused"
    assert isinstance(actions[-1], p.Failed) and r.state is p.MigrationState.FAILED


@pytest.mark.parametrize("cut", [0, 1, 7])
def test_receiver_restart_resume(cut: int) -> None:
    """A destination 'restart' (fresh machines, same disk) resumes from the pending set."""
    image = image_of(12, 9)
    dest = ToyDestination()
    key = NodeKey.generate()
    first = Pair(image, dest, key=key)
    first.cut_after = cut
    first.run()
    second = Pair(image, dest, key=key)
    second.run()
    assert dest.stored["vm.img"] == image
    assert second.frames_sent == 12 - cut
