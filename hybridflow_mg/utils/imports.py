"""Importing user code by name: a module (`my_pkg.my_module`) or a Python file (`path/to/file.py`).

The one place the project imports code a config names: `run.imports` (modules that register
estimators, losses or rewards before the config's names are validated) and reward functions given by
path (`reward.fn: path/to/file.py:fn`). Every failure is a one-line ValueError that names what the
config asked for (`what`) and the problem; a traceback would hide which key was wrong.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Iterable


def one_line(e: BaseException) -> str:
    """`Type: first line of the message` (the rest of a multi-line message is dropped)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def is_file_spec(spec: str) -> bool:
    """Whether `spec` names a file (`x.py`, or anything with a path separator) rather than a module."""
    return spec.endswith(".py") or "/" in spec or os.sep in spec


def import_file(path: str, *, what: str) -> ModuleType:
    """The Python file `path` (relative to the working directory) as a module, imported once per process.

    It is imported under a private name derived from its absolute path, so its folder need not be a
    package or on `sys.path`, and two files of the same name do not collide. Raises ValueError for a
    missing file, a syntax error (with its line) or an exception while importing.
    """
    if not os.path.isfile(path):
        raise ValueError(f"{what}: file {path!r} does not exist (cwd {os.getcwd()!r})")
    full = os.path.abspath(path)
    name = "_hybridflow_mg_user_" + hashlib.sha1(full.encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, full)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"{what}: {path!r} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # before exec, as a normal import does (dataclasses, pickling need it)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        del sys.modules[name]
        raise ValueError(f"{what}: {path!r} line {e.lineno} has a syntax error: {e.msg}") from None
    except Exception as e:
        del sys.modules[name]
        raise ValueError(f"{what}: importing {path!r} failed: {one_line(e)}") from None
    return module


def import_module(dotted: str, *, what: str) -> ModuleType:
    """`importlib.import_module(dotted)`, with failures as one-line ValueErrors naming `what`."""
    try:
        return importlib.import_module(dotted)
    except SyntaxError as e:
        raise ValueError(f"{what}: {e.filename!r} line {e.lineno} has a syntax error: {e.msg}") from None
    except Exception as e:
        raise ValueError(f"{what}: importing module {dotted!r} failed: {one_line(e)}") from None


def import_user_modules(specs: Iterable[str], *, key: str = "run.imports") -> list[ModuleType]:
    """Import each module or file of `specs` (config key `key`), in order; importing twice is a no-op.

    This runs on every rank before a config's registry names are checked, so that what these
    modules register (`@ADVANTAGES.register(...)`, `@REWARD_FNS.register(...)`, ...) can be named in
    YAML and in command-line overrides.
    """
    modules = []
    for i, spec in enumerate(specs):
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"{key}[{i}] must name a module (my_pkg.my_module) or a file (path/to/file.py); "
                             f"got {spec!r}")
        what = f"{key}[{i}] = {spec!r}"
        modules.append(import_file(spec, what=what) if is_file_spec(spec) else import_module(spec, what=what))
    return modules
