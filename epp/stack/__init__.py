"""Local stacks of real processes (simulated fleet, epp, Envoy) for the demo, tests and benchmarks."""
