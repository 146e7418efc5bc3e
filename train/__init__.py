"""eossl.train."""
