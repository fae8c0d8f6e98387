"""Print the lower bound of every dependency in pyproject.toml as an exact pin.

`make test-oldest` installs with these as constraints, so the suite runs against the
oldest releases pyproject.toml claims to accept: the ranges stay honest.  (pip cannot
resolve to the lowest versions by itself.)  Packages those pull in come at their newest.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

FLOOR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)")


def floors(pyproject: Path) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    found: dict[str, str] = {}
    for req in requirements:
        m = FLOOR.match(req)
        if m and m.group(1).lower() != project["name"]:
            found[m.group(1).lower()] = m.group(2)
    return found


if __name__ == "__main__":
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("pyproject.toml")
    for name, version in sorted(floors(path).items()):
        print(f"{name}=={version}")
