"""dntsync: wireless resource management and digital-network-twin synchronisation.

Layers, lowest first: `network` (physics, numpy), `env` (multi-agent environment), `twin`
(GRU digital twin), `marl` (VDN / IQL learners), `stages` (one module per DVC stage).
Lower layers never import higher ones.
"""

__version__ = "0.1.0"
