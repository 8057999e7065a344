"""The dwcp node (``dwcp-node``): config, data directory, control socket, metrics, daemon.

Layers, outermost first: ``daemon`` (asyncio phases, signals) binds ``control``
(the CLI's local socket), ``metrics`` (one Prometheus registry per node) and
``store`` (the data directory) around the migration glue in ``dwcp.migrate``.
``config`` is loaded and validated once, then passed around frozen.
"""
