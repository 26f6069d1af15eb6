"""The Python a test runs inside a container to see what its process may do there."""

from __future__ import annotations


def write_probe(writes: dict[str, str], exists: dict[str, str] | None = None) -> str:
    """Source that prints one JSON line: its uid and gid, for each name in `writes` what opening
    that path for writing gave ("wrote" or the OS error's text), for each in `exists` whether
    that path exists."""
    return (
        "import json, os\n"
        "def tries(path):\n"
        "    try:\n"
        "        open(path, 'w').close()\n"
        "        return 'wrote'\n"
        "    except OSError as err:\n"
        "        return err.strerror\n"
        f"writes, exists = {writes!r}, {exists or {}!r}\n"
        "seen = {'uid': os.getuid(), 'gid': os.getgid()}\n"
        "seen.update({name: tries(path) for name, path in writes.items()})\n"
        "seen.update({name: os.path.exists(path) for name, path in exists.items()})\n"
        "print(json.dumps(seen))"
    )
