"""eossl.eval."""
