"""eossl.streaming."""
