"""Face generators behind one interface, and safe loaders for their public checkpoint formats."""
