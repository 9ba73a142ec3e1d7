"""A program's fingerprint: one hash over everything that changes its answers, so that the cache
never serves an answer of another program.

It covers the variant's settings (signature, module, import path, pins, `output_field`), the
module's state (demos, instructions), the bytes of its state file or saved program, and the source
of its code: every Python file of the top-level package of each class the program is made of (or
the single file of a top-level module), DSPy's own classes excepted (DSPy's version is a dependency
of the service, not of the program). Changing a program's code and restarting turns every cached
answer of it into a miss; restarting the same code keeps them valid.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from dspy_service.models_config import VariantSpec


def code_files(objects: Iterable[Any]) -> list[Path]:
    """The Python source files of the packages that define `objects` (classes, functions)."""
    files: set[Path] = set()
    for obj in objects:
        module_name = getattr(obj, "__module__", None)
        if not module_name or module_name.split(".")[0] in ("dspy", "builtins"):
            continue
        top = sys.modules.get(module_name.split(".")[0])
        if top is None:
            continue
        package_paths = getattr(top, "__path__", None)
        if package_paths:
            for directory in package_paths:
                files.update(Path(directory).rglob("*.py"))
        elif getattr(top, "__file__", None):
            files.add(Path(top.__file__))  # type: ignore[arg-type]  # checked just above
        module = sys.modules.get(module_name)
        if module is not None and getattr(module, "__file__", None):
            files.add(Path(module.__file__))  # type: ignore[arg-type]  # checked just above
    return sorted(files)


def _hash_files(digest: Any, paths: Iterable[Path]) -> None:
    for path in paths:
        digest.update(str(path.name).encode())
        try:
            digest.update(path.read_bytes())
        except OSError:
            digest.update(b"<unreadable>")


def program_fingerprint(spec: VariantSpec, module: Any, code: Iterable[Any]) -> str:
    """The variant's fingerprint (24 hex digits) from its spec, its module's state and its code."""
    digest = hashlib.sha256()
    settings = [
        spec.kind,
        spec.signature,
        spec.module,
        spec.instructions,
        sorted(spec.models.items()),
        spec.output_field,
    ]
    digest.update(orjson.dumps(settings))
    digest.update(orjson.dumps(module.dump_state(), option=orjson.OPT_SORT_KEYS, default=str))
    files: list[Path] = []
    if spec.program is not None:
        files.append(spec.program)
    if spec.saved is not None:
        files.extend(sorted(p for p in spec.saved.iterdir() if p.is_file()))
    _hash_files(digest, files)
    _hash_files(digest, code_files(code))
    return digest.hexdigest()[:24]
