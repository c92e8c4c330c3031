"""The gRPC services: validate a request, call the engine, encode the answer."""
