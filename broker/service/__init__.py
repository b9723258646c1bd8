"""gRPC adapter: servicer.py decodes and encodes, status.py maps errors, server.py runs."""
