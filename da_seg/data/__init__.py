"""Data layer: domain descriptors, datasets, label decoding, rare-class sampling, preparation tools."""
