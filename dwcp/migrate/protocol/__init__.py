"""Sans-IO migration protocol: a ``Sender`` and a ``Receiver`` state machine.

Flow (version 3): the source sends a signed ``Offer`` (the manifest's counts, its
tree root and a content id) and the summary as ``Part(SUMMARY)`` pieces (the 1 MiB
parents of the groups that hold data); the destination matches each piece against
its image index as it arrives, asks for the leaves of the groups it lacks
(``Part(NEED)``), merges the ``Part(LEAVES)`` pieces into the manifest, plans from
the index and answers ``PlanHeader`` and the ranges it still lacks (``Part(RANGES)``;
on a resumed transfer only what is still pending); the source streams delta frames
(``Data`` or the transport's bulk path), then ``Done`` with counts and the signed
whole-image SHA-256, computed while the plan and the data travelled; the
destination rebuilds, verifies against that SHA-256, fsyncs, renames, indexes and
answers ``Ack``. No message grows with the image: pieces carry at most
``messages.MAX_PART`` bytes, and the destination knows the memory an offer needs
before it holds anything for it.

Each machine is fed events (``handle``) and returns actions; it never touches a
file, a socket or a clock. The glue (``source`` and ``destination``) performs the
actions and feeds their results back as events. Transitions live in one table per
role, as in h11: an event not in the table for the current state is a protocol
error that names both.
"""

from dwcp.migrate.protocol.core import (
    LINGER_SECONDS,
    TERMINAL,
    WIRE_ALLOWANCE,
    WIRE_SLACK,
    Action,
    Admitted,
    AssembleManifest,
    Completed,
    ConnectionLost,
    Ending,
    Event,
    ExpectFrames,
    Failed,
    FeedLeaves,
    FeedSummary,
    Finished,
    FinishTransfer,
    FrameReceived,
    FrameWritten,
    LeavesFed,
    LeavesSent,
    LocalFailure,
    Machine,
    MessageReceived,
    MigrationState,
    Prepared,
    PrepareTransfer,
    ProvideLeaves,
    SendMessage,
    SendNeed,
    SendSummary,
    Start,
    StreamFinished,
    StreamRanges,
    SummaryFed,
    WriteFrame,
    event_name,
    failure_for,
    transfer_id_for,
)
from dwcp.migrate.protocol.receiver import Receiver, ReceiverStats, header_of
from dwcp.migrate.protocol.sender import Sender, SenderStats

__all__ = [
    "LINGER_SECONDS",
    "TERMINAL",
    "WIRE_ALLOWANCE",
    "WIRE_SLACK",
    "Action",
    "Admitted",
    "AssembleManifest",
    "Completed",
    "ConnectionLost",
    "Ending",
    "Event",
    "ExpectFrames",
    "Failed",
    "FeedLeaves",
    "FeedSummary",
    "FinishTransfer",
    "Finished",
    "FrameReceived",
    "FrameWritten",
    "LeavesFed",
    "LeavesSent",
    "LocalFailure",
    "Machine",
    "MessageReceived",
    "MigrationState",
    "PrepareTransfer",
    "Prepared",
    "ProvideLeaves",
    "Receiver",
    "ReceiverStats",
    "SendMessage",
    "SendNeed",
    "SendSummary",
    "Sender",
    "SenderStats",
    "Start",
    "StreamFinished",
    "StreamRanges",
    "SummaryFed",
    "WriteFrame",
    "event_name",
    "failure_for",
    "header_of",
    "transfer_id_for",
]
