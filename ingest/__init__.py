"""eossl.ingest."""
