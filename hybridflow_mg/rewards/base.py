"""The reward-function contract, its registry, and the seam for a model-based scorer.

A *reward function* scores one response:

    fn(solution: str, ground_truth, *, data_source: str = "", extra_info: dict | None = None) -> float

* `solution` is the decoded response alone (the prompt is not included), special tokens removed.
* `ground_truth` is what the data file holds for the sample (`reward_model.ground_truth` in verl's
  schema): a string for text tasks; structured tasks such as countdown also accept the mapping (or
  its JSON text) that the file stores.
* `data_source` and `extra_info` are the sample's own columns, passed through untouched so that one
  function can serve several datasets.
* It returns a float; the built-in rules return 1.0 for a correct answer and 0.0 otherwise.

Rules may take more keyword-only options with defaults (the built-ins take `format_score`, the score
of a response that has a well-formed answer that is wrong). `compose.build_reward_fn` passes
`format_score` to every function that declares it and `options` from the config to the one named.

Register with `@REWARD_FNS.register("name")` in any module imported before the run; or name a
function by path in the config (`"path/to/file.py:fn"` or `"package.module:fn"`), no registration
needed. Functions must be pure and cheap: they run once per response on the CPU.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

from hybridflow_mg.utils.registry import Registry


class RewardFn(Protocol):
    """The signature every reward function has (see the module docstring)."""

    def __call__(
        self, solution: str, ground_truth: Any, *, data_source: str = "", extra_info: dict | None = None
    ) -> float: ...


REWARD_FNS: Registry[RewardFn] = Registry("reward function")


class RewardModelScorer(Protocol):
    """Seam for a Megatron reward model (`rewards/model.py`, not part of this module).

    The rule rewards above score text. A reward model scores tokens: it is a megatron-core `GPTModel`
    with a scalar head living on the same TP×PP×DP grid as the actor, so it is built by the trainer
    with the other roles and called once per rollout batch on every rank (SPMD):

        scorer(prompt_ids, response_ids) -> list[float]

    * `prompt_ids[i]`, `response_ids[i]`: the token ids of sample i in the *actor's* vocabulary (one
      list per sample, no padding); a scorer with a different tokenizer re-tokenizes internally.
    * Returns one score per sample, the head's output at the last response token, in input order.
    * Every rank passes the same whole batch and gets the same whole result; how it shards over DP
      and pipelines over PP is the scorer's business.

    Nothing here builds or calls one yet; how its scores combine with the rule scores (a weighted sum
    per sample is the natural choice, like `compose.weighted_mix`) is decided where it is built.
    """

    def __call__(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> list[float]: ...
