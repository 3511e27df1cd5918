"""Leaf utilities shared by data, models, methods and the engine.

Nothing in this package imports any other part of da_seg, so every import in the project can
point downward to it: files (atomic writes), TOML writing, sliding windows, images for logging,
metrics and torch.distributed helpers.
"""
