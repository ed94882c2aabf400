"""Every value a later stage would refuse (vLLM's SamplingParams / engine arguments, megatron-core's optimizer
and schedules, torch and NumPy seeding, the trainer's own loops) is refused when the config loads, with one
line naming the key, or at the latest during setup, before anything is built (issue 13 item 2).

Rows: (overrides on configs/quickstart.yaml, a part of the one line). Checks that need the model's
config.json or the tokenizer run in `tests/test_hostile_train.py`'s table through `train --nproc 2`; the
ones here that need a model use an in-memory spec.
"""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hybridflow_mg.config.load import ConfigError, load_config
from hybridflow_mg.trainer.config import TrainConfig
from tests.clirun import cli
from tests.tiny import llama_config

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"

LOAD_TIME = [  # (overrides, a part of the message); quickstart: 4 ranks, tp 2, 4 heads, 4 layers, lengths 32 + 6
    # rollout: vLLM's SamplingParams and engine-argument ranges
    ("rollout.temperature=3", "temperature must be a number in [0, 2] (vLLM's range"),
    ("rollout.temperature=nan", "temperature must be a number in [0, 2]"),
    ("rollout.temperature=0 rollout.n=1 algo.advantage.estimator=gae", "rollout.temperature must be positive for RL"),
    ("rollout.temperature=0.005", "rollout.temperature must be positive for RL, at least 0.01"),
    ("rollout.n=20000", "n=20000 is more samples per prompt than vLLM allows (16384"),
    ("rollout.top_p=0", "top_p must be a number in (0.0, 1.0]"),
    ("rollout.top_k=-1", "top_k must be an integer ≥ 0"),
    ("rollout.max_new_tokens=0", "max_new_tokens must be an integer ≥ 1"),
    ("rollout.stop_token_ids=[-1]", "stop_token_ids must be a list of non-negative token ids"),
    ("rollout.seed=4294967296", "which NumPy takes only up to 2**32 - 1"),
    ("rollout.max_num_batched_tokens=128", "max_num_batched_tokens=128 must be ≥ max_num_seqs=256"),
    ("rollout.gpu_memory_utilization=1.5", "gpu_memory_utilization must be a number in (0.0, 1.0]"),
    ("rollout.block_size=0", "block_size must be an integer ≥ 1"),
    ("rollout.max_model_len=6", "max_new_tokens=6 leaves no room for a prompt within max_model_len=6"),
    ("rollout.dtype=fp8", "'rollout.dtype' must be one of"),
    ("reward.dynamic_sampling=true rollout.n=1 algo.advantage.estimator=gae", "every sample would be dropped"),
    # layouts
    ("parallel.gen.pp=0", "parallel.gen: pp must be a positive integer, got 0"),
    ("parallel.train.vpp=2", "vpp=2 needs pp > 1"),
    ("parallel.train.tp=0", "tp must be a positive integer"),
    ("dist.timeout_minutes=0", "timeout_minutes must be a positive integer"),
    # run
    ("run.seed=-1", "seed must be an integer in [0, 2**63)"),
    ("run.seed=9223372036854775808", "seed must be an integer in [0, 2**63)"),
    ("run.name=", "name must name a run directory under output_dir"),
    ("run.name=..", "name must name a run directory under output_dir"),
    ("run.name=/tmp/elsewhere", "name must name a run directory under output_dir (no absolute path"),
    ("run.name=a/../../b", "name must name a run directory under output_dir (no absolute path, no '..')"),
    # model
    ("model.synthetic.num_heads=3", "hidden_size=256 must be a multiple of num_heads=3"),
    ("model.synthetic.num_train=10", "data.prompts_per_step=32 is more than the model.synthetic.num_train=10"),
    ("model.synthetic.num_warm_start=10",
     "actor.warm_start.batch_size=64 is more than the model.synthetic.num_warm_start=10"),
    ("model.synthetic.max_operand=5", "distinct problems exist with max_operand=5"),
    ("model.synthetic.seed=-1", "seed must be an integer ≥ 0, got -1"),
    ("model.vocab_divisor=0", "vocab_divisor must be an integer ≥ 1"),
    # optimizers (torch's Adam refuses what megatron-core's fused ones would silently diverge on)
    ("actor.optim.lr=nan", "lr must be a finite number > 0"),
    ("actor.optim.lr=inf", "lr must be a finite number > 0"),
    ("actor.optim.lr=0", "lr must be a finite number > 0"),
    ("actor.optim.beta1=1.5", "beta1 must be a finite number in [0, 1)"),
    ("critic.optim.beta2=1", "beta2 must be a finite number in [0, 1)"),
    ("actor.optim.eps=-1e-8", "eps must be a finite number ≥ 0"),
    ("actor.optim.weight_decay=nan", "weight_decay must be a finite number ≥ 0"),
    ("actor.optim.clip_grad=inf", "clip_grad must be a finite number ≥ 0 (0 turns clipping off)"),
    ("actor.optim.min_lr=1", "min_lr must be a finite number in [0, 0.0002] (up to lr)"),
    ("actor.optim.lr_warmup_steps=120", "actor.optim.lr_warmup_steps=120 must be below trainer.total_steps=120"),
    ("critic.optim.lr_warmup_steps=200", "critic.optim.lr_warmup_steps=200 must be below trainer.total_steps=120"),
    ("actor.optim.lr_warmup_steps=5 actor.optim.lr_decay_steps=5", "lr_warmup_steps=5 must be below lr_decay_steps=5"),
    ("actor.warm_start.lr=-1", "lr must be a finite number > 0"),
    ("actor.warm_start.batch_size=0", "batch_size must be an integer ≥ 1"),
    ("actor.warm_start.files=[answers.txt]", "files[0] = 'answers.txt' has an unsupported extension"),
    # batches
    ("actor.micro_batch_tokens=37", "actor.micro_batch_tokens=37 cannot hold one sequence of data.max_prompt_length "
                                    "+ rollout.max_new_tokens = 38 tokens"),
    ("critic.micro_batch_tokens=8", "critic.micro_batch_tokens=8 cannot hold one sequence"),
    ("actor.mini_batches=0", "mini_batches must be an integer ≥ 1"),
    ("data.prompts_per_step=0", "prompts_per_step must be a positive integer"),
    ("data.val_prompts_per_step=0", "val_prompts_per_step must be a positive integer or null"),
    ("data.truncation=middle", "truncation must be one of error, drop, left, right"),
    # algorithm
    ("algo.kl.coef=nan", "coef must be a finite number ≥ 0"),
    ("algo.kl.coef=-0.1", "coef must be a finite number ≥ 0"),
    ("algo.kl.target=0", "target must be a positive number"),
    ("algo.kl.horizon=0", "horizon must be a positive integer"),
    ("algo.entropy.coef=inf", "coef must be a finite number ≥ 0"),
    ("algo.advantage.eps=inf", "eps must be a finite positive number"),
    ("algo.advantage.gamma=1.5", "gamma must be a number in [0.0, 1.0]"),
    ("algo.advantage.lam=nan", "lam must be a number in [0.0, 1.0]"),
    ("algo.policy_loss.clip_eps=0", "clip_eps must be a number in (0.0, 1.0]"),
    ("algo.policy_loss.dual_clip_c=1", "dual_clip_c must be a number > 1"),
    ("algo.value_loss.clip_eps=0", "clip_eps must be a positive number"),
    ("reward.format_score=1", "format_score must be in [0, 1)"),
    # loop
    ("trainer.total_steps=0", "total_steps must be an integer ≥ 1"),
    ("trainer.save_before_deadline=inf", "save_before_deadline must be a positive number of seconds"),
    ("trainer.max_bad_steps=0", "max_bad_steps must be an integer ≥ 1"),
]


@pytest.mark.parametrize("overrides,message", LOAD_TIME, ids=[row[0] for row in LOAD_TIME])
def test_a_bad_value_is_one_line_when_the_config_loads(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, QUICKSTART, overrides.split())
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_the_edges_of_the_ranges_load():
    cfg = load_config(TrainConfig, QUICKSTART, [
        "rollout.temperature=2", "run.seed=0", "rollout.seed=4294967295", "actor.optim.beta1=0", "actor.optim.eps=0",
        "rollout.n=16384", "actor.micro_batch_tokens=38", "actor.optim.lr_warmup_steps=119", "algo.kl.coef=0",
        "rollout.max_num_batched_tokens=256", "data.prompts_per_step=192", "actor.warm_start.batch_size=600"])
    assert cfg.rollout.temperature == 2.0 and cfg.actor.micro_batch_tokens == 38
    assert load_config(TrainConfig, QUICKSTART, ["rollout.temperature=0.01"]).rollout.temperature == 0.01


WORLD_TIME = [  # (arguments of `config --world N`, a part of the message): the batch split over the world
    (["--world", "4", "data.prompts_per_step=31"], "must be a multiple of the data-parallel size 2"),
    (["--world", "4", "actor.warm_start.batch_size=63"],
     "actor.warm_start.batch_size=63 must be a multiple of the data-parallel size 2"),
    (["--world", "3"], "does not divide the world of 3 ranks"),
]


@pytest.mark.parametrize("args,message", WORLD_TIME, ids=[" ".join(row[0]) for row in WORLD_TIME])
def test_a_batch_that_does_not_split_over_the_world_is_one_line(args, message):
    proc = cli("config", QUICKSTART, *args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr


SETUP_TIME = [  # (model config.json overrides, train tp, pp, gen tp, a part of the message)
    (dict(num_attention_heads=4, num_key_value_heads=2), 4, 1, 4,
     "parallel.train (tp=4, pp=1, vpp=1) cannot split model.path (m): num_kv_heads=2 is not divisible by "
     "megatron tp=4"),
    (dict(num_hidden_layers=3), 1, 2, 1, "num_layers=3 is not divisible by pp·vpp = 2·1 = 2"),
    (dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=384), 1, 1, 3,
     "the generation tp=3 (parallel.gen.tp, else parallel.train.tp) cannot split model.path (m) for vLLM: vllm tp=3 "
     "and num_kv_heads=2: one must divide the other"),
    (dict(num_hidden_layers=3), 1, 1, (1, 2), "parallel.gen.pp=2 does not divide the 3 layers of model.path (m)"),
]


@pytest.mark.parametrize("hf,tp,pp,gen_tp,message", SETUP_TIME, ids=["train tp", "train pp", "gen tp", "gen pp"])
def test_a_layout_that_does_not_split_the_model_is_one_line_at_setup(hf, tp, pp, gen_tp, message):
    """`trainer/inputs.py: check_layouts`, which the launcher runs on the model's config.json (in-memory here)."""
    from hybridflow_mg.models.hf_spec import spec_from_hf
    from hybridflow_mg.trainer.inputs import check_layouts

    gen_tp, gen_pp = gen_tp if isinstance(gen_tp, tuple) else (gen_tp, 1)
    cfg = load_config(TrainConfig, None, ["model.path=m", "data.train_files=[x.parquet]", "rollout.n=2",
                                          f"parallel.train.tp={tp}", f"parallel.train.pp={pp}",
                                          f"parallel.gen.tp={gen_tp}", f"parallel.gen.pp={gen_pp}"])
    with pytest.raises(ValueError) as err:
        check_layouts(cfg, spec_from_hf(llama_config(**hf), head="lm"))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a CPU-only machine cannot run")
@pytest.mark.parametrize("override,message", [
    ("model.dtype=bfloat16", "model.dtype=bfloat16 needs a GPU"),
    ("rollout.block_size=48", "rollout.block_size=48: vLLM's CPU attention needs a multiple of 32; use 64"),
    ("model.layer_spec=te", "model.layer_spec=te: layer spec 'te' needs transformer-engine and a GPU"),
])
def test_what_this_machine_cannot_run_is_one_line_before_launch(override, message, tmp_path):
    proc = cli("train", QUICKSTART, "--nproc", "4", f"run.output_dir={tmp_path}", override)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    assert not any(tmp_path.iterdir())


def test_a_warm_start_batch_larger_than_its_examples_is_one_line_before_any_step():
    from hybridflow_mg.trainer.warm_start import warm_start

    cfg = load_config(TrainConfig, QUICKSTART, ["actor.warm_start.batch_size=4"])
    item = SimpleNamespace(prompt_ids=[1, 2], extra_info={"answer": "3"}, ground_truth="3")
    run = SimpleNamespace(cfg=cfg, grid=None, tokenizer=SimpleNamespace(encode=lambda text: [5], eos_id=2),
                          train_batches=SimpleNamespace(dataset=SimpleNamespace(items=[item] * 3)))
    with pytest.raises(ValueError, match=r"actor.warm_start.batch_size=4 is more than the 3 warm-start examples "
                                         r"\(the training prompts\)"):
        warm_start(run)
