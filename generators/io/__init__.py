"""What the checkpoint formats share: the allow-list unpickler, format detection and the format table."""
