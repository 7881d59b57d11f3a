"""Process limits a server (and a load generator) needs: one socket per client."""

from __future__ import annotations


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard limit (as vLLM does at start-up): 512 streaming clients
    and a GPU runtime's own descriptors pass the common default of 1,024. Returns the soft limit now."""
    try:
        import resource
    except ImportError:  # NOTE: not on Windows; nothing to lift there
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or target <= soft:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):  # NOTE: a container may refuse; the default limit then stands
        return soft
    return target
