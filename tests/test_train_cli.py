"""`hybridflow-mg train` refuses bad input with one line before any process starts."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.clirun import cli
from tests.tiny import llama_config, save_random_hf


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    model = save_random_hf(llama_config(hidden_size=128, num_attention_heads=2, num_key_value_heads=2), root / "m")
    rows = [{"prompt": [{"role": "user", "content": "1+1="}], "data_source": "openai/gsm8k",
             "reward_model": {"ground_truth": "2", "style": "rule"}}]
    pq.write_table(pa.Table.from_pylist(rows), root / "good.parquet")
    pq.write_table(pa.Table.from_pylist([{"question": "1+1=", "answer": "2"}]), root / "no_prompt.parquet")
    pq.write_table(pa.Table.from_pylist(rows).slice(0, 0), root / "empty.parquet")
    (root / "empty.jsonl").write_text("\n")
    (root / "broken_reward.py").write_text("def score(:\n")
    preset = root / "preset.yaml"
    # one sample per prompt (rollout.n=1): an estimator without groups
    preset.write_text(f"model: {{path: {model}}}\ndata: {{train_files: [{root / 'good.parquet'}]}}\n"
                      "algo: {advantage: {estimator: reinforce_plus_plus}}\n")
    return root, preset


def _one_line(proc, message):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybridflow-mg: error:") and message in lines[0], proc.stderr


def test_dataset_without_the_prompt_column(setup):
    root, preset = setup
    _one_line(cli("train", preset, f"data.train_files=[{root / 'no_prompt.parquet'}]"),
              "has no column 'prompt' (columns: answer, question); set data.prompt_key")


@pytest.mark.parametrize("name", ["empty.parquet", "empty.jsonl"])
def test_empty_dataset(setup, name):
    root, preset = setup
    _one_line(cli("train", preset, f"data.train_files=[{root / name}]"), "holds no rows")


def test_missing_dataset_file(setup):
    root, preset = setup
    _one_line(cli("train", preset, f"data.train_files=[{root / 'nope.parquet'}]"), "does not exist")


@pytest.mark.parametrize("override,message", [
    ("algo.advantage.estimator=grpoo", "unknown advantage estimator 'grpoo' (did you mean 'grpo'?); valid names: gae, grpo"),
    ("algo.policy_loss.name=ppo", "unknown policy loss 'ppo'"),
    ("algo.kl.estimator=k4", "unknown KL estimator 'k4'"),
])
def test_unknown_estimator_and_loss_names_list_the_valid_ones(setup, override, message):
    _, preset = setup
    _one_line(cli("train", preset, override), message)


def test_reward_function_path_that_does_not_import(setup):
    root, preset = setup
    _one_line(cli("train", preset, f"reward.fn={root / 'broken_reward.py'}:score"), "broken_reward.py")
    _one_line(cli("train", preset, f"reward.fn={root / 'missing.py'}:score"), "missing.py")


def test_model_path_without_config(setup):
    root, preset = setup
    _one_line(cli("train", preset, f"model.path={root}"), "is not an HF model directory")


def test_prompts_that_do_not_split_over_data_parallel_ranks(setup):
    _, preset = setup
    _one_line(cli("train", preset, "--nproc", "4", "parallel.train.tp=2", "data.prompts_per_step=3"),
              "must be a multiple of the data-parallel size 2")


def test_zero_temperature_is_refused_for_rl(setup):
    _, preset = setup
    _one_line(cli("train", preset, "rollout.temperature=0"), "rollout.temperature must be positive")


def test_names_registered_by_run_imports_are_valid_and_a_misspelt_one_gets_the_closest_match(setup):
    root, preset = setup
    module = root / "my_estimators.py"
    module.write_text("from hybridflow_mg.algos import ADVANTAGES\n\n"
                      "@ADVANTAGES.register('centered_returns', needs=('values',))\n"
                      "def centered_returns(inp, cfg):\n    return inp.scores(), inp.scores()\n")
    ok = cli("config", preset, f"run.imports=[{module}]", "algo.advantage.estimator=centered_returns")
    assert ok.returncode == 0, ok.stderr
    _one_line(cli("train", preset, f"run.imports=[{module}]", "algo.advantage.estimator=centred_returns"),
              "unknown advantage estimator 'centred_returns' (did you mean 'centered_returns'?)")


@pytest.mark.parametrize("spec,message", [
    ("no_such_module_xyz", "run.imports[0] = 'no_such_module_xyz': importing module 'no_such_module_xyz' failed"),
    ("missing_file.py", "run.imports[0] = 'missing_file.py': file 'missing_file.py' does not exist"),
])
def test_run_imports_that_do_not_import(setup, spec, message):
    _, preset = setup
    _one_line(cli("train", preset, f"run.imports=[{spec}]"), message)
