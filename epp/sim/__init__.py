"""A simulated vLLM fleet: OpenAI API, Prometheus metrics and KV events, with a timing model."""
