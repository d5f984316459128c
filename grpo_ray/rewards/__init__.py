"""Reward functions and the import-path registry.

`load("pkg.module:function")` resolves a reward path from the config to the
function a RewardActor scores with; `reward_name(fn)` is the name its metrics
carry (`rewards/<name>/mean`, as in TRL). Reward functions have TRL's
signature and are called as TRL calls them, by keyword:
`fn(prompts=..., completions=..., completion_ids=..., **columns)`.

Kept free of heavy imports (no torch): reward actors import this first.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import types
from typing import Any, Callable

__all__ = ["TRL_SIGNATURE", "RewardImportError", "RewardLoadError", "load", "reward_name"]

TRL_SIGNATURE = "fn(prompts, completions, completion_ids=None, **columns) -> list[float | None]"
_EXAMPLE_PATH = "grpo_ray.rewards.gsm8k:correctness_reward"
_TRL_ARGUMENTS = ("prompts", "completions", "completion_ids")
# Stands for the dataset columns (`answer`, ...) that arrive as extra keywords.
_PROBE_COLUMN = "_grpo_ray_probe_column"
_MISSING = object()


class RewardLoadError(ValueError):
    """A reward path that does not name a usable reward function."""


class RewardImportError(RewardLoadError, ImportError):
    """The module of a reward path does not import."""


def load(path: str) -> Callable[..., list[float | None]]:
    """The reward function at `path`, `"pkg.module:function"` or `"pkg.module.function"`.

    Raises RewardImportError (an ImportError) when the module does not import,
    and RewardLoadError (a ValueError) when the path is malformed, the attribute
    is missing, not callable, or cannot take TRL's keyword arguments.
    """
    module_name, attr = _split(path)
    module = _import_module(module_name, path)
    fn = getattr(module, attr, _MISSING)
    if fn is _MISSING:
        fn = _submodule(module_name, attr)
    if fn is _MISSING:
        raise RewardLoadError(_missing_message(path, module, attr))
    if isinstance(fn, types.ModuleType):
        raise RewardLoadError(
            f"reward path {path!r} names the module {fn.__name__!r}, not a function in it: "
            f"write '{fn.__name__}:<function>'.{_callables_hint(fn)}"
        )
    if inspect.isclass(fn):
        raise RewardLoadError(
            f"reward path {path!r} names the class {fn.__qualname__!r}; create an instance at "
            f"module level (e.g. `my_reward = {fn.__name__}(...)`) and name that instance instead"
        )
    if not callable(fn):
        raise RewardLoadError(
            f"reward path {path!r} names a value of type {type(fn).__name__!r}, not a callable: "
            f"name a function with TRL's signature {TRL_SIGNATURE}.{_callables_hint(module)}"
        )
    _check_signature(fn, path)
    return fn


def reward_name(fn: Callable[..., Any]) -> str:
    """The name of a reward in metrics: `fn.__name__`, a partial's function's, else the class name."""
    if isinstance(fn, functools.partial):
        return reward_name(fn.func)
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__name__


def _split(path: Any) -> tuple[str, str]:
    """(module, attribute) of a reward path, or RewardLoadError saying what a valid path looks like."""
    expected = f"expected 'package.module:function' or 'package.module.function', e.g. {_EXAMPLE_PATH!r}"
    if not isinstance(path, str):
        raise RewardLoadError(f"reward path must be a string, got {type(path).__name__} {path!r}; {expected}")
    path = path.strip()
    if path.count(":") > 1:
        raise RewardLoadError(f"malformed reward path {path!r}: more than one ':'; {expected}")
    if ":" in path:
        module_name, attr = path.split(":")
    else:
        module_name, _, attr = path.rpartition(".")
    module_ok = bool(module_name) and all(part.isidentifier() for part in module_name.split("."))
    if not module_ok or not attr.isidentifier():
        raise RewardLoadError(f"malformed reward path {path!r}: {expected}")
    return module_name, attr


def _import_module(module_name: str, path: str) -> types.ModuleType:
    try:
        return importlib.import_module(module_name)
    except Exception as error:  # a module may fail with anything while it runs
        raise RewardImportError(
            f"reward path {path!r}: cannot import module {module_name!r} "
            f"({type(error).__name__}: {error}); check the module name, and that it is installed "
            "or on PYTHONPATH (on a Ray cluster: in the job's working_dir or py_modules)"
        ) from error


def _submodule(module_name: str, attr: str) -> Any:
    """`module_name.attr` when it is a module not yet imported as an attribute, else _MISSING."""
    try:
        return importlib.import_module(f"{module_name}.{attr}")
    except Exception:
        return _MISSING


def _public_callables(module: types.ModuleType) -> list[str]:
    """Public non-class callables defined in (not imported into) `module`, sorted."""
    names = []
    for name, obj in vars(module).items():
        if name.startswith("_") or not callable(obj) or inspect.isclass(obj):
            continue
        if inspect.isroutine(obj) and getattr(obj, "__module__", None) != module.__name__:
            continue  # imported functions
        if type(obj).__module__ == "typing":
            continue  # `from typing import Callable` is callable too
        names.append(name)
    return sorted(names)


def _callables_hint(module: types.ModuleType) -> str:
    names = _public_callables(module)
    if not names:
        return f" Module {module.__name__!r} defines no public callables."
    return f" Public callables in {module.__name__!r}: {', '.join(names)}."


def _missing_message(path: str, module: types.ModuleType, attr: str) -> str:
    nearest = difflib.get_close_matches(attr, _public_callables(module), n=1, cutoff=0.5)
    message = f"reward path {path!r}: module {module.__name__!r} has no attribute {attr!r}."
    if nearest:
        message += f" Did you mean '{module.__name__}:{nearest[0]}'?"
    return message + _callables_hint(module)


def _check_signature(fn: Callable[..., Any], path: str) -> None:
    """RewardLoadError unless `fn(prompts=, completions=, completion_ids=, **columns)` binds.

    Required parameters with other names are taken for dataset columns
    (`answer`), which only the data can confirm.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # builtins without introspectable signatures: trust them
        return
    name = reward_name(fn)
    expected = (
        f"reward path {path!r}: {name}{signature} cannot be called as TRL calls reward functions, "
        f"{TRL_SIGNATURE}, with every argument passed by keyword"
    )
    fix = f"define it as `def {name}(prompts, completions, completion_ids=None, **columns)`"
    try:
        signature.bind_partial(prompts=[], completions=[], completion_ids=None, **{_PROBE_COLUMN: []})
    except TypeError as error:
        if not any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values()):
            raise RewardLoadError(
                f"{expected}: it takes no **kwargs, so the dataset columns cannot be passed; {fix}"
            ) from None
        raise RewardLoadError(f"{expected}: {error}; {fix}") from None
    required = [p for p in signature.parameters.values() if p.default is p.empty]
    unfillable = [p.name for p in required if p.kind is p.POSITIONAL_ONLY]
    if unfillable:
        raise RewardLoadError(
            f"{expected}: its positional-only parameters {unfillable} cannot be passed by keyword; {fix}"
        )
    misnamed = [
        p.name for p in required if p.kind is p.POSITIONAL_OR_KEYWORD and p.name not in _TRL_ARGUMENTS
    ]
    leading = next(iter(signature.parameters), None)
    if "completions" not in signature.parameters and misnamed and leading == misnamed[0]:
        # `def f(p, c, **kw)`, written for positional calls, gets the completions in **kw and fails on 'p'.
        raise RewardLoadError(
            f"{expected}: it has no 'completions' parameter but requires {misnamed}, which would be "
            f"looked up as dataset columns; rename them to 'prompts', 'completions' or {fix}"
        )


def start_sandbox(paths: list[str], funcs: list[Callable[..., Any]]) -> None:
    """Start the code sandbox that any of `funcs` (loaded from `paths`) needs; none: nothing to do.

    Called before any scoring (a RewardActor's start, `grpo-ray eval`), so that a node without
    bubblewrap stops with the install command instead of scoring None for every completion; the
    sandbox it starts stays warm for the first job.
    """
    from grpo_ray import sandbox

    needing = [path for path, fn in zip(paths, funcs) if sandbox.needs_sandbox(fn)]
    if not needing:
        return
    try:
        sandbox.check_available()
    except sandbox.SandboxUnavailable as error:
        raise RewardLoadError(
            f"{', '.join(needing)} run completions in the code sandbox, which cannot start on this node: {error}"
        ) from error
