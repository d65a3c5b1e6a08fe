"""Protocol edges: Envoy ext_proc, epp's own Pick API, gRPC health, TLS."""
