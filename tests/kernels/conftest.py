"""The kernel tests pin the speed paths themselves, so they run with the paths allowed.

The rest of the suite honours `LORAKIT_KERNELS=0` (then it runs on the reference everywhere); these
tests would otherwise check a path that is switched off. A `disabled()` inside a test still turns
paths off, as the tests comparing both ways need.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _kernels_allowed(kernels_allowed):
    yield
