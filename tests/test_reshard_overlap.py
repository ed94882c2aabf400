"""The overlapped reshard executor on 4 gloo ranks: the serial executor's bits, bytes and collectives."""
import re

import pytest
import torch

from tests.multirank import assert_rank_check, check_names

MODULE = "tests.ranks.reshard_overlap4"


@pytest.mark.parametrize("name", check_names(MODULE))
def test_overlapped_reshard_on_4_ranks(name):
    assert_rank_check(MODULE, 4, name)


def test_negative_workspace_bound_is_refused():
    from hybridflow_mg.models.hf_spec import spec_from_hf
    from hybridflow_mg.parallel.layout import ParallelLayout
    from hybridflow_mg.reshard.execute import Resharder
    from hybridflow_mg.reshard.plan import plan_reshard
    from tests.tiny import llama_config

    plan = plan_reshard(spec_from_hf(llama_config()).dims, ParallelLayout(world=1, tp=1, pp=1, gen_tp=1), 0)
    sources = [torch.zeros(t.shape) for t in plan.train]
    dests = [torch.zeros(d.shape) for d in plan.dests]
    with pytest.raises(ValueError, match="max_workspace_bytes must be >= 0"):
        Resharder(plan, sources, dests, micro_group=None, replica_group=None, max_workspace_bytes=-1)


@pytest.mark.parametrize("override,message", [
    ("rollout.reshard.bucket_bytes=0", "rollout.reshard: bucket_bytes must be an integer ≥ 1, got 0"),
    ("rollout.reshard.max_workspace_bytes=-1", "rollout.reshard: max_workspace_bytes must be an integer ≥ 0, got -1"),
    ("rollout.reshard.overlap=maybe", "'rollout.reshard.overlap' must be true or false"),
])
def test_reshard_config_refuses_bad_values(override, message):
    from pathlib import Path

    from hybridflow_mg.config.load import ConfigError, load_config
    from hybridflow_mg.trainer.config import TrainConfig

    quickstart = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    cfg = load_config(TrainConfig, quickstart)
    assert (cfg.rollout.reshard.bucket_bytes, cfg.rollout.reshard.overlap) == (256 << 20, None)  # as before
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(TrainConfig, quickstart, [override])
