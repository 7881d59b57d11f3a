"""utils.limits: the open-files soft limit is lifted to the hard one."""

from __future__ import annotations

import pytest

resource = pytest.importorskip("resource")


def test_open_files_soft_limit_rises_to_the_hard_limit():
    from autoglm_trt.utils.limits import raise_open_files_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and hard > 64:
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        got = raise_open_files_limit()
        now, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert got == now and (now == hard or hard == resource.RLIM_INFINITY)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
