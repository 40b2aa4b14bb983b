import pytest

from functransforms.core.levels import level_stack


@pytest.fixture(autouse=True)
def clean_level_stack():
    """Every test must leave the level stack as it found it (empty)."""
    assert level_stack() == []
    yield
    leftover = list(level_stack())
    level_stack().clear()
    assert leftover == [], f"level stack left dirty: {leftover}"
