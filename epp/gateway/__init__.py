"""`epp gateway`: the picker and a real Envoy in front of it, as a whole front door."""
