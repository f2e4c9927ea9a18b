"""``morphcache demo`` (placeholder)."""


def demo_command() -> int:
    """Run the offline end-to-end demo (not yet implemented)."""
    return 2
