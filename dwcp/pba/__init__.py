"""PBA: predictive bandwidth allocation, what dwcp knows and decides about a path.

Today this gathers the pieces that exist: the parallelism policy that sets a
session's connections x streams from measured goodput (``parallelism``), the
zstd level that follows the encoder's and the host's CPU (``compression``,
``hostcpu``). The per-connection path model itself (BBR's windowed max of the
delivery rate and min of the RTT) paces every QUIC connection and lives with
the transport (``dwcp.transport.bbr``), whose snapshots feed this package.
The path predictor (``predictor``: P10/P50/P90 of a path's rate for the next
second or a whole transfer, ``Predictor.predict`` / ``eta``), the synthetic
and recorded link-rate traces it is evaluated on (``traces``) and the offline
evaluation (``evaluate``) live here too, with the per-peer path history that
warms new sessions and answers planners (``paths``: ``PathStore.predict(peer,
horizon_s)`` -> ``RateDistribution``, the API for ITP's shares and ETAs) and the
starting zstd level chosen from the predicted rate and a data sample (``zlevel``).
All modules here are sans-IO: they take samples and ``now``, never read a clock.
"""
