"""corral.runtime: the OCI runtime library and its runc-compatible CLI."""
