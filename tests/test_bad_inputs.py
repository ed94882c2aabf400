"""Hostile input (issue 16): every bad input is one line `hybridflow-mg: error: ...`, exit 2, nothing written.

Table-driven: a case builds what it needs in its own scratch folder and returns the command line; that
folder must be byte-identical afterwards (nothing created, nothing half-written, nothing replaced).
Commands run in-process with the worker launcher and `torch.distributed` start replaced by a failure,
so every check is shown to fire before a process or an engine would start.
"""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.clirun import cli
from tests.multirank import ROOT
from tests.tiny import llama_config, save_random_hf

VOCAB, CONTEXT = 250, 128  # tests.tiny.llama_config
SHARD = "model/mp_rank_00_000.safetensors"
POISONED = "decoder.layers.0.mlp.linear_fc1.weight"


@dataclass(frozen=True)
class World:
    model: Path  # tiny HF Llama (no tokenizer)
    ckpt: Path  # its checkpoint at tp=1


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_inputs")
    model = save_random_hf(llama_config(), root / "m")
    assert cli("convert", "--hf", model, "--out", root / "ck").returncode == 0
    return World(model=model, ckpt=root / "ck")


@pytest.fixture
def no_start(monkeypatch):
    """Starting workers or torch.distributed fails the case: every check must come before."""
    import hybridflow_mg.parallel.launch as launch
    import hybridflow_mg.parallel.local_launch as local_launch

    def refuse(*_a, **_k):
        raise AssertionError("started workers or torch.distributed before the inputs were checked")

    monkeypatch.setattr(local_launch, "launch_local", refuse)
    monkeypatch.setattr(launch, "init_distributed", refuse)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` → its bytes (None for a folder)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


# ---- case builders: (world, scratch folder) → command line ----------------------------------------

def prompts_file(d: Path, *lines: str) -> Path:
    (d / "p.jsonl").write_text("".join(line + "\n" for line in lines))
    return d / "p.jsonl"


def generate(*lines: str, flags: tuple = ("--max-tokens", 8)) -> Callable[[World, Path], list]:
    def build(w: World, d: Path) -> list:
        return ["generate", "--hf", w.model, "--prompts", prompts_file(d, *lines), "--out", d / "out.jsonl", *flags]
    return build


def ids(*tokens) -> str:
    return json.dumps({"prompt_ids": list(tokens)})


GOOD = ids(1, 17, 33)


def copy_ckpt(w: World, d: Path) -> Path:
    shutil.copytree(w.ckpt, d / "ck")
    return d / "ck"


def poisoned_ckpt(value: float) -> Callable[[World, Path], list]:
    def build(w: World, d: Path) -> list:
        ckpt = copy_ckpt(w, d)
        tensors = load_file(ckpt / SHARD)
        tensors[POISONED][0, 3] = value
        save_file(tensors, ckpt / SHARD, metadata={"format": "hybridflow_mg.megatron/1"})
        return ["export", "--ckpt", ckpt, "--out", d / "hf"]
    return build


def hf_without_config(w: World, d: Path) -> list:
    (d / "m").mkdir()
    shutil.copy(w.model / "model.safetensors", d / "m")
    return ["convert", "--hf", d / "m", "--out", d / "ck"]


def out_not_empty(w: World, d: Path) -> list:
    (d / "ck").mkdir()
    (d / "ck" / "notes.txt").write_text("mine")
    return ["convert", "--hf", w.model, "--out", d / "ck"]


def out_is_a_file(command: str) -> Callable[[World, Path], list]:
    def build(w: World, d: Path) -> list:
        (d / "taken").write_text("mine")
        src = ["--hf", w.model] if command == "convert" else ["--ckpt", w.ckpt]
        return [command, *src, "--out", d / "taken"]
    return build


def out_parent_not_writable(w: World, d: Path) -> list:
    if os.geteuid() == 0:  # root writes through any mode bits; sysfs refuses new folders even to root
        return ["convert", "--hf", w.model, "--out", "/sys/hybridflow_bad_inputs_ck"]
    (d / "ro").mkdir(mode=0o555)
    return ["convert", "--hf", w.model, "--out", d / "ro" / "ck"]


def out_under_a_file(w: World, d: Path) -> list:
    (d / "f.txt").write_text("mine")
    return ["convert", "--hf", w.model, "--out", d / "f.txt" / "ck"]


def overwrite_with_a_broken_source(w: World, d: Path) -> list:
    ckpt = copy_ckpt(w, d)
    shutil.copytree(w.model, d / "m")
    cfg = json.loads((d / "m" / "config.json").read_text())
    (d / "m" / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    return ["convert", "--hf", d / "m", "--out", ckpt, "--overwrite"]


CASES = {
    # generate: prompts file, reported as FILE:LINE
    "prompt longer than the context": (generate(GOOD, ids(*[1] * 125)),
                                       "p.jsonl:2: prompt of 125 tokens + --max-tokens 8 exceeds the model's context of 128"),
    "token id equal to the vocab size": (generate(ids(1, VOCAB)), "p.jsonl:1: token id 250 at 'prompt_ids'[1] is outside"),
    "token id 100000": (generate(GOOD, GOOD, ids(100000)), "p.jsonl:3: token id 100000"),
    "negative token id": (generate(ids(1, -1)), "p.jsonl:1: token id -1"),
    "bare JSON number": (generate("5"), "p.jsonl:1: a line must be a JSON object, not a number"),
    "JSON string": (generate('"hello"'), "p.jsonl:1: a line must be a JSON object, not a string"),
    "invalid JSON": (generate(GOOD, '{"prompt_ids": [1, 2'), "p.jsonl:2: not valid JSON"),
    "prompt_ids a string": (generate('{"prompt_ids": "abc"}'), "p.jsonl:1: 'prompt_ids' must be a list of token ids, not a string"),
    "prompt_ids empty": (generate(ids()), "p.jsonl:1: 'prompt_ids' is empty"),
    "prompt_ids with a non-int": (generate(ids(1, "x")), "p.jsonl:1: 'prompt_ids'[1] is \"x\", not an integer"),
    "prompt_ids with a float": (generate(ids(1, 2.5)), "p.jsonl:1: 'prompt_ids'[1] is 2.5, not an integer"),
    "prompt_ids with a boolean": (generate(ids(1, True)), "p.jsonl:1: 'prompt_ids'[1] is true"),
    "neither prompt_ids nor prompt": (generate('{"text": "hi"}'), "p.jsonl:1: a line needs 'prompt_ids' or 'prompt'"),
    "prompt text without a tokenizer": (generate('{"prompt": "hi"}'), "p.jsonl:1: 'prompt' text needs a tokenizer"),
    "no prompts": (generate("", "  "), "has no prompts"),
    # generate: flags
    "--max-tokens above the context": (generate(GOOD, flags=("--max-tokens", 500)), "--max-tokens 500 leaves no room"),
    "--max-tokens equal to the context": (generate(GOOD, flags=("--max-tokens", CONTEXT)), "--max-tokens 128 leaves no room"),
    "--max-tokens 0": (generate(GOOD, flags=("--max-tokens", 0)), "--max-tokens must be at least 1"),
    "--max-model-len above the context": (generate(GOOD, flags=("--max-model-len", 500)),
                                          "--max-model-len 500 exceeds the model's context of 128"),
    "prompt + --max-tokens beyond --max-model-len": (
        generate(GOOD, ids(*[1] * 20), flags=("--max-tokens", 8, "--max-model-len", 24)),
        "p.jsonl:2: prompt of 20 tokens + --max-tokens 8 exceeds --max-model-len 24; shorten the prompt to at most 16"),
    "--greedy with --n 2": (generate(GOOD, flags=("--greedy", "--n", 2)), "--n 2 with greedy decoding gives 2 identical"),
    "--greedy with --n 2 under --nproc 2": (generate(GOOD, flags=("--nproc", 2, "--greedy", "--n", 2)),
                                            "--n 2 with greedy decoding gives 2 identical"),
    "--max-model-len 0": (generate(GOOD, flags=("--max-model-len", 0)), "--max-model-len must be at least 1, got 0"),
    "--nproc 0": (generate(GOOD, flags=("--nproc", 0)), "--nproc must be at least 1, got 0"),
    "--gen pp not dividing the layers": (generate(GOOD, flags=("--gen", "pp=3")), "--gen pp=3 does not divide the 2 layers"),
    "--nproc=2 with a bad prompt": (generate(ids(VOCAB), flags=("--nproc=2",)), "p.jsonl:1: token id 250"),
    "--nproc 3 with tp=2": (generate(GOOD, flags=("--nproc", 3, "--train", "tp=2,pp=1")), "does not divide the world of 3"),
    "generate --hf a file": (lambda w, d: ["generate", "--hf", w.model / "model.safetensors", "--prompts",
                                           prompts_file(d, GOOD)], "is a file, not a directory"),
    "generate --out in a missing folder": (lambda w, d: ["generate", "--hf", w.model, "--prompts", prompts_file(d, GOOD),
                                                         "--out", d / "no" / "out.jsonl"], "does not exist; create it"),
    # convert
    "convert --hf a safetensors file": (lambda w, d: ["convert", "--hf", w.model / "model.safetensors", "--out", d / "ck"],
                                        "model.safetensors' is a file, not a directory"),
    "convert --hf without config.json": (hf_without_config, "has no config.json"),
    "convert --hf missing": (lambda w, d: ["convert", "--hf", d / "nothing", "--out", d / "ck"], "nothing' does not exist"),
    "convert --out an existing checkpoint": (lambda w, d: ["convert", "--hf", w.model, "--out", copy_ckpt(w, d)],
                                             "already holds a checkpoint; pass --overwrite"),
    "convert --out a non-empty folder": (out_not_empty, "is not empty; pass --overwrite"),
    "convert --overwrite a non-checkpoint": (lambda w, d: [*out_not_empty(w, d), "--overwrite"],
                                             "holds notes.txt, which is no checkpoint"),
    "convert --out an existing file": (out_is_a_file("convert"), "taken' is a file"),
    "convert --out parent not writable": (out_parent_not_writable, "choose a directory you can write"),
    "convert --out under a file": (out_under_a_file, "is a file, so no directory can be made there"),
    "convert --overwrite from a broken model": (overwrite_with_a_broken_source, "config.json implies"),
    # export
    "export a checkpoint with NaN": (poisoned_ckpt(float("nan")), f"tensor {POISONED!r} in"),
    "export a checkpoint with inf": (poisoned_ckpt(float("-inf")), "has 0 NaN and 1 inf values"),
    "export --out an existing file": (out_is_a_file("export"), "taken' is a file"),
}


@pytest.mark.parametrize("build,key", CASES.values(), ids=CASES.keys())
def test_bad_input_is_one_line_exit_2_and_writes_nothing(world, no_start, tmp_path, build, key):
    argv = build(world, tmp_path)
    before = snapshot(tmp_path)
    try:
        proc = cli(*argv)
    finally:
        for p in tmp_path.rglob("*"):  # let pytest clean up a read-only folder
            if p.is_dir():
                p.chmod(0o755)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("hybridflow-mg: error:"), proc.stderr
    assert key in lines[0], lines[0]
    assert snapshot(tmp_path) == before, "the failed command wrote or changed files"
    assert not Path("/sys/hybridflow_bad_inputs_ck").exists()


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_overwrite_replaces_a_checkpoint_whole(world, tmp_path, first, second):
    """--overwrite at another tp leaves exactly what a fresh convert writes: no stale shard, no leftovers."""
    assert cli("convert", "--hf", world.model, "--out", tmp_path / "ck", "--tp", first).returncode == 0
    proc = cli("convert", "--hf", world.model, "--out", tmp_path / "ck", "--tp", second, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert cli("convert", "--hf", world.model, "--out", tmp_path / "fresh", "--tp", second).returncode == 0
    assert snapshot(tmp_path / "ck") == snapshot(tmp_path / "fresh")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "fresh"]


def test_allow_nonfinite_exports_anyway(world, tmp_path):
    argv = poisoned_ckpt(float("nan"))(world, tmp_path)
    proc = cli(*argv, "--allow-nonfinite")
    assert proc.returncode == 0, proc.stderr
    assert torch.isnan(load_file(tmp_path / "hf" / "model.safetensors")["model.layers.0.mlp.gate_proj.weight"]).any()


def test_a_real_launcher_rejects_a_bad_prompt_before_starting_workers(world, tmp_path):
    """`--nproc 2` as a user runs it: the launching process says it, in one line, with exit 2."""
    proc = subprocess.run([sys.executable, "-m", "hybridflow_mg.cli", "generate", "--hf", str(world.model), "--nproc",
                           "2", "--prompts", str(prompts_file(tmp_path, ids(-3)))],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"hybridflow-mg: error: {tmp_path / 'p.jsonl'}:1: token id -3 at 'prompt_ids'[0] is outside the vocabulary: "
        f"ids run 0..249 (vocab_size in {world.model / 'config.json'})"], proc.stderr


def test_export_help_documents_allow_nonfinite():
    from hybridflow_mg.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert "--allow-nonfinite" in sub.choices["export"].format_help()


def test_good_input_reaches_the_launcher(world, no_start, tmp_path):
    """The guard of the table bites: valid input goes on to start workers (here refused, exit 1)."""
    proc = cli(*generate(GOOD, flags=("--nproc", 2, "--max-tokens", CONTEXT - 3))(world, tmp_path))
    assert proc.returncode == 1 and "started workers" in proc.stderr, proc.stderr
