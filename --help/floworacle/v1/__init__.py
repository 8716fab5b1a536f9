"""Generated from proto/floworacle/v1 (do not edit)."""
