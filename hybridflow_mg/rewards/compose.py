"""From a `RewardConfig` to one reward function: names and paths resolved, options bound, terms mixed,
and samples dispatched on their data source.

`build_reward_fn(cfg)` is what the trainer calls once; the result has the `RewardFn` signature and
`score_batch` applies it to a rollout batch.
"""
from __future__ import annotations

import functools
import inspect
import math
import numbers
from typing import Any, Mapping, Sequence

from hybridflow_mg.rewards.base import REWARD_FNS, RewardFn
from hybridflow_mg.rewards.config import RewardConfig
from hybridflow_mg.utils.imports import import_file, import_module, is_file_spec

DEFAULT_BY_DATA_SOURCE: dict[str, str] = {
    "gsm8k": "gsm8k",
    "math": "math",
    "countdown": "countdown",
    "synthetic/arithmetic": "arithmetic",
}
"""Data-source substring → built-in reward function (verl names: `openai/gsm8k`, `lighteval/MATH`)."""


@functools.cache
def load_fn_by_path(spec: str) -> RewardFn:
    """The function named by `path/to/file.py:fn` or `package.module:fn`, imported once per process.

    A file is imported under a private module name (its directory need not be a package or on
    `sys.path`). Every failure — no such file or module, a syntax or import error inside it, no such
    attribute, not callable — is a one-line ValueError naming `spec` and the problem.
    """
    where, colon, attr = spec.rpartition(":")
    if not colon or not where or not attr:
        raise ValueError(f"reward function {spec!r} must look like 'path/to/file.py:fn' or 'package.module:fn'")
    what = f"reward function {spec!r}"
    module = import_file(where, what=what) if is_file_spec(where) else import_module(where, what=what)
    if not hasattr(module, attr):
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ValueError(
            f"reward function {spec!r}: {where!r} has no attribute {attr!r} (callables: {', '.join(defined) or 'none'})"
        )
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(f"reward function {spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def resolve(spec: str) -> RewardFn:
    """A registered name (`gsm8k`) or a function by path (`file.py:fn`, `pkg.mod:fn`)."""
    if ":" in spec:
        return load_fn_by_path(spec)
    try:
        return REWARD_FNS.get(spec)
    except ValueError as e:
        raise ValueError(f"{e}; or name a function by path, 'path/to/file.py:fn'") from None


def bind(spec: str, options: Mapping[str, Any] | None = None, *, format_score: float | None = None) -> RewardFn:
    """`resolve(spec)` with keyword `options` bound, and `format_score` bound too when the function
    takes it and `options` does not set it. An option the function does not take is a ValueError."""
    fn = resolve(spec)
    kwargs = dict(options or {})
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # some builtins and C callables have no signature: pass nothing extra
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in kwargs:
        if not takes_any and key not in params:
            choices = [k for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
            raise ValueError(
                f"reward function {spec!r} takes no option {key!r} (keyword options: {', '.join(choices) or 'none'})"
            )
    if format_score is not None and "format_score" in params and "format_score" not in kwargs:
        kwargs["format_score"] = format_score
    return checked(functools.partial(fn, **kwargs) if kwargs else fn, spec)


class RewardValueError(ValueError):
    """A reward function returned something that is not a finite number. Raised on the rank that scored
    the sample, which need not be every rank: the CLI prints it from whichever rank raises it."""

    one_rank = True


def as_reward(value: Any, name: str) -> float:
    """`value` as a float reward; a RewardValueError naming the function `name` when it is not a finite
    real number (bool, int, float, numpy scalars and one-element tensors are numbers)."""
    number = value
    if not isinstance(number, numbers.Real) and hasattr(number, "item"):
        try:
            number = number.item()  # numpy / torch scalars and one-element arrays
        except (TypeError, ValueError, RuntimeError):
            pass
    if isinstance(number, numbers.Real) and math.isfinite(float(number)):
        return float(number)
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    raise RewardValueError(f"reward function {name} returned {text} ({type(value).__name__}); a reward must be a finite "
                           "number: fix the function")


def reward_name(fn: Any) -> str:
    """How errors name a reward function: its config spec, else its qualified name."""
    return getattr(fn, "reward_name", None) or repr(getattr(fn, "__qualname__", None) or type(fn).__name__)


def checked(fn: RewardFn, spec: str) -> RewardFn:
    """`fn` with its return value checked by `as_reward` and named `spec` in the error."""
    name = repr(spec)

    @functools.wraps(fn if not isinstance(fn, functools.partial) else fn.func)
    def score(solution: str, ground_truth: Any, *, data_source: str = "", extra_info: dict | None = None) -> float:
        return as_reward(fn(solution, ground_truth, data_source=data_source, extra_info=extra_info), name)

    score.reward_name = name
    return score


def weighted_mix(terms: Sequence[tuple[RewardFn, float]]) -> RewardFn:
    """One function returning `sum(weight * fn(...))` over `terms`."""
    if not terms:
        raise ValueError("a weighted mix needs at least one (function, weight) term")
    terms = [(fn, float(w)) for fn, w in terms]

    def mixed(solution: str, ground_truth: Any, *, data_source: str = "", extra_info: dict | None = None) -> float:
        return sum(w * as_reward(fn(solution, ground_truth, data_source=data_source, extra_info=extra_info), reward_name(fn))
                   for fn, w in terms)

    return mixed


def match_data_source(data_source: str, keys) -> str | None:
    """The key of `keys` that names `data_source`: a case-insensitive substring of it, the longest (then
    the alphabetically first) of those that match; None when none does."""
    low = data_source.lower()
    return next((k for k in sorted(keys, key=lambda k: (-len(k), k)) if k.lower() in low), None)


def by_data_source(*tables: Mapping[str, RewardFn], where: str = "reward.by_data_source") -> RewardFn:
    """One function that picks a reward function by the sample's `data_source`.

    Each table maps data-source substrings to functions; tables are consulted in order (user
    overrides first, then the built-ins), and within a table the longest matching key wins (so
    `synthetic/countdown` can differ from `countdown`). Matching ignores case. An unmatched source is a
    ValueError naming the known keys and the config key `where`.
    """
    chosen: dict[str, RewardFn] = {}

    def dispatch(solution: str, ground_truth: Any, *, data_source: str = "", extra_info: dict | None = None) -> float:
        fn = chosen.get(data_source)
        if fn is None:
            fn = next((table[k] for table in tables if (k := match_data_source(data_source, table)) is not None), None)
            if fn is None:
                known = ", ".join(dict.fromkeys(k for table in tables
                                                for k in sorted(table, key=lambda k: (-len(k), k))))
                raise ValueError(
                    f"no reward function for data_source {data_source!r} (known substrings: {known or 'none'}); "
                    f"map it in {where} or set reward.fn"
                )
            chosen[data_source] = fn
        return fn(solution, ground_truth, data_source=data_source, extra_info=extra_info)

    return dispatch


def build_reward_fn(cfg: RewardConfig) -> RewardFn:
    """The reward function a run uses, with every name and path resolved now (a typo fails at start-up,
    not at the first rollout). See `RewardConfig` for the precedence of fn, mix and dispatch."""
    if cfg.fn is not None:
        return bind(cfg.fn, cfg.options, format_score=cfg.format_score)
    if cfg.mix:
        return weighted_mix([(bind(t.fn, t.options, format_score=cfg.format_score), t.weight) for t in cfg.mix])
    tables = [cfg.by_data_source, DEFAULT_BY_DATA_SOURCE if cfg.builtin_data_sources else {}]
    if not any(tables):
        raise ValueError("reward: no reward function: set reward.fn, reward.mix or reward.by_data_source")
    return by_data_source(*({k: bind(v, format_score=cfg.format_score) for k, v in t.items()} for t in tables))


def score_batch(
    fn: RewardFn,
    solutions: Sequence[str],
    ground_truths: Sequence[Any],
    data_sources: Sequence[str] | None = None,
    extra_infos: Sequence[dict | None] | None = None,
    indices: Sequence[int] | None = None,
) -> list[float]:
    """`fn` applied to each sample of a batch, in order; the optional columns default to "" / None.

    Every score must be a finite number: anything else (NaN, inf, None, a string) raises a one-line
    RewardValueError naming the function, the sample (its data row in `indices` when given), its data
    source and the value."""
    n = len(solutions)
    if len(ground_truths) != n or (data_sources is not None and len(data_sources) != n) or (
        extra_infos is not None and len(extra_infos) != n
    ):
        raise ValueError("score_batch: solutions, ground_truths, data_sources and extra_infos must be equally long")
    sources = data_sources if data_sources is not None else [""] * n
    infos = extra_infos if extra_infos is not None else [None] * n
    name = reward_name(fn)
    out = []
    for i, (s, gt, ds, info) in enumerate(zip(solutions, ground_truths, sources, infos)):
        try:
            out.append(as_reward(fn(s, gt, data_source=ds, extra_info=info), name))
        except RewardValueError as e:
            row = f"data row {indices[i]}" if indices is not None else f"sample {i} of the batch"
            raise RewardValueError(f"{row} (data_source {ds!r}): {e}") from None
    return out
