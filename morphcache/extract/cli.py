"""``morphcache extract`` and ``store replay-check`` / ``store show`` (placeholder)."""


def extract_command() -> int:
    """Extract teacher tokens (not yet implemented)."""
    return 2


def replay_check_command() -> int:
    """Re-render stored views and compare teacher tokens with the cache (not yet implemented)."""
    return 2


def show_command() -> int:
    """Draw rendered views beside PCA maps of their tokens (not yet implemented)."""
    return 2
