"""The pinned packages a GPU node needs beside its own CUDA PyTorch: `make wheelhouse` reads this.

    python -m workflow.wheelhouse            # name==version, one per line
    python -m workflow.wheelhouse --data-only   # the packages installed without dependencies

The list is the dependency closure of this project's pinned dependencies (pyproject.toml), read from
the installed environment's metadata, so it never drifts from what `make install` resolved. Left out:
PyTorch and what it brings itself (a CUDA build must come from the node's image; a wheel from here
would be the CPU one), and numpy, which every PyTorch image has.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

# The node's Python: markers are evaluated for it, not for the Python running this.
NODE_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
            "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
            "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
FROM_THE_IMAGE = {"torch", "numpy"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: list[str], skip: set[str] = frozenset()) -> dict[str, str]:
    """{name: installed version} of `roots` and everything they require on the node, except `skip`
    and what only `skip` requires."""
    installed = {norm(d.metadata["Name"]): d for d in md.distributions()}
    found: dict[str, str] = {}
    todo = [norm(r) for r in roots]
    while todo:
        name = todo.pop()
        if name in found or name in skip:
            continue
        if name not in installed:
            raise SystemExit(f"{name} is required but not installed here: run `make install` first")
        found[name] = installed[name].version
        for spec in installed[name].requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate(NODE_ENV):
                todo.append(norm(req.name))
    return found


def data_only(pyproject: Path = Path("pyproject.toml")) -> list[str]:
    """Packages read for their data files only (pyproject's tool.deepspeed-diffusers.data-only), pinned."""
    return tomllib.loads(pyproject.read_text())["tool"]["deepspeed-diffusers"]["data-only"]


def node_packages(pyproject: Path = Path("pyproject.toml")) -> dict[str, str]:
    roots = [Requirement(r).name for r in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]
    skip = {norm(n) for n in FROM_THE_IMAGE}
    # What PyTorch requires (sympy, networkx, triton, the CUDA libraries, ...) is in its image too.
    torch_deps = set(closure(["torch"])) - skip
    pinned = {norm(Requirement(r).name): str(Requirement(r).specifier).lstrip("=") for r in data_only(pyproject)}
    return {n: v for n, v in closure(roots, skip | torch_deps).items()} | pinned


if __name__ == "__main__":
    if sys.argv[1:] == ["--data-only"]:
        sys.stdout.write(" ".join(data_only()) + "\n")
    else:
        for name, version in sorted(node_packages().items()):
            sys.stdout.write(f"{name}=={version}\n")
