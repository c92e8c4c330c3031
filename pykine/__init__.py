"""pykine: an etcd v3 API server that keeps its data in ordinary databases."""

__version__ = "0.1.0"
