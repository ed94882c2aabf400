"""parallel/progress.py without processes: stage records in a store, who is behind, and the two ways
a stall is reported (the error a timed-out collective raises; the watchdog before a backend aborts)."""
import time

import torch.distributed as dist

from hybridflow_mg.parallel.progress import Progress, StalledRanks


def _peer(store, rank, count, step, stage):
    store.set(f"hybridflow/progress/{rank}", f"{count}|{step}|{stage}")


def test_the_ranks_behind_are_named_and_a_rank_behind_keeps_its_own_error():
    store = dist.HashStore()
    me = Progress(store, 0, 3, timeout_minutes=1, watch=False)
    for stage in ("reward", "ref", "advantages"):
        me.arrive(stage, 1)
    _peer(store, 1, 2, 1, "reward")
    _peer(store, 2, 4, 1, "advantages")
    assert me.laggards()[0] == [1]
    me.entered -= 45  # waited 45 s of the 60: a timeout, not an early failure of its own
    err = me.explain(RuntimeError("[gloo] Timed out waiting 60000ms for recv operation to complete"))
    assert isinstance(err, StalledRanks) and not err.already_said
    assert str(err).startswith("rank 1 stopped making progress in stage 'reward' of step 1; the other ranks waited in "
                               "'advantages' until dist.timeout_minutes=1 ran out (rank 0 then failed with RuntimeError")
    own = ValueError("bad input")
    assert me.explain(own) is own
    early = Progress(store, 1, 3, timeout_minutes=1, watch=False)  # rank 1 again, now behind everyone
    early.entered -= 45
    oom = RuntimeError("out of memory")
    assert early.explain(oom) is oom  # rank 1 is behind itself: its own error stands
    me.entered = time.monotonic()  # failed early in its stage: not a wait for the others
    assert me.explain(oom) is oom


def test_nobody_behind_or_one_rank_explains_nothing():
    store = dist.HashStore()
    me = Progress(store, 0, 2, timeout_minutes=1, watch=False)
    _peer(store, 1, 1, 0, "setup")
    me.entered -= 59
    err = RuntimeError("timeout")
    assert me.explain(err) is err
    alone = Progress(dist.HashStore(), 0, 1, timeout_minutes=1)
    alone.entered -= 59
    assert alone.explain(err) is err


def test_the_watchdog_reports_once_before_the_timeout(capsys, monkeypatch):
    monkeypatch.delenv("HYBRIDFLOW_ERROR_DIR", raising=False)
    store = dist.HashStore()
    _peer(store, 1, 1, 0, "setup")
    me = Progress(store, 0, 2, timeout_minutes=0.01)  # 0.6 s: reports after 0.54 s in one stage
    me.arrive("advantages", 3)
    deadline = time.monotonic() + 10
    while me.reported is None and time.monotonic() < deadline:
        time.sleep(0.05)
    me.close()
    assert me.reported.startswith("rank 1 stopped making progress in stage 'setup' of step 0; the other ranks waited "
                                  "in 'advantages' until dist.timeout_minutes=0.01 ran out (reported by rank 0")
    assert capsys.readouterr().err == f"hybridflow-mg: error: {me.reported}\n"
    assert me.explain(RuntimeError("Timed out")).already_said  # the CLI says nothing more
