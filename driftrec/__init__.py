"""driftrec: online adaptive recommendation over Kafka and Redis."""

__version__ = "0.7.1"
