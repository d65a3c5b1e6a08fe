"""epp: an endpoint picker for LLM inference gateways."""

__version__ = "0.1.0"
