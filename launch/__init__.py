"""eossl.launch."""
