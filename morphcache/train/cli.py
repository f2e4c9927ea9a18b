"""``morphcache train`` (placeholder)."""


def train_command() -> int:
    """Pretrain a student from a store (not yet implemented)."""
    return 2
