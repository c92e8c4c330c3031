"""pykine's serving layer: HTTP/2 and HTTP/1.1 on one port, gRPC over HTTP/2. It knows nothing of etcd."""
