"""Monitoring (Burns ch. 3, 5, 14): what each replica reports (``stats``), the adapters that
turn it into Loom's metric names (``adapters``), the per-node sidecar that serves it to
Prometheus (``sidecar``; locally a Ray actor, ``sidecar_actor``), and the GPUs (``gpu``)."""
