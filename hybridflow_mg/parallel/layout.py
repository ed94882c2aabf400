"""The training and generation layouts of the 3D-HybridEngine, as pure data (no processes, no torch).

Training layout (Megatron, order tp-cp-ep-dp-pp):  rank = tp + t·(dp + d·pp).
Generation layout (vLLM): every training replica (the t·p ranks sharing a dp index) is regrouped
into d_g = t·p / (t_g·p_g) generation replicas of t_g·p_g ranks (HybridFlow §5, p_g-t_g-d_g-d).
When t_g·p_g is a multiple of t·p instead, one generation replica spans (t_g·p_g)/(t·p) consecutive
training replicas (d_g = 1): each still holds the whole model, so every rank's shard is still fetched
inside its own training replica.

Micro-DP grouping (HybridFlow §5.2, Fig. 8). Picture the model as a unit square: the TP axis
(output rows of each weight) times the layer axis. A rank's training shard is the rectangle
[tp/t, (tp+1)/t) × (its stage's layers); a generation shard is [tg/t_g, ..) × [pg/p_g, ..).
When t_g | t and p_g | p we give each rank the generation shard that contains its training shard:
tg = tp // (t/t_g), pg = pp // (p/p_g). The d_g ranks that land on one generation shard form its
micro-DP group; all-gathering inside it is the only traffic, (d_g − 1)/(t·p)·M bytes per rank.

When t_g > t (and p_g = 1) no training shard fits in one generation shard; the generation shard
that holds the most of it is a slice inside the rank's own TP slice: gen tp g goes to a rank with
train tp g // (t_g/t), tg = tp·(t_g/t) + pp mod (t_g/t). Minimum received, as a fraction of M
(derivation: a generation shard is 1/(t_g·p_g) of M; a rank holds at most the overlap of its TP
interval, width min(1/t, 1/t_g), times its layers, min(1/p, 1/p_g) of them, when the intervals nest):

    recv_min = 1/(t_g·p_g) − 1/(max(t, t_g) · max(p, p_g)),

which is HybridFlow's (d_g − 1)/(t·p) when t_g | t and p_g | p (§5.2), and (p − 1)/(t_g·p) for
t_g > t, p_g = 1 (e.g. (4,4) → t_g 8: 3/32, where any one generation shard is 1/8). Every rank
reaches it at once: a training replica has p ranks per train tp value and (t_g/t)·d_g = p generation
slots inside that value's slice, so the counts match (`recv_fraction` is checked against a brute
force over all assignments in tests/test_layout.py).

vLLM seam. vLLM (external_launcher) numbers its ranks consecutively: ExternalDP × PP × TP, and its
`GroupCoordinator` takes rank_in_group = position in the list, while torch's `new_group` orders a
group by sorted world rank — so the groups we hand vLLM must be sorted lists and a rank's
generation coordinate `GenCoord.tp` must be its sorted position. With t_g < t that makes
generation-TP groups strided by t/t_g across each Megatron TP group, exactly the optimal grouping.
With t_g > t the sorted positions are not the optimal slices (one group may be world ranks 0..3 of
(t,p) = (2,2)), so the layer weights are placed apart from the position: `GenCoord.weight_tp` is the
TP slice of the per-layer weights (attention heads with their KV heads, MLP columns) a rank holds.
vLLM's TP layers only sum over slices (row-parallel all-reduce) or keep them local, so any
permutation of head / column blocks over the group computes the same output; only the
vocab-parallel embedding (masked by rank_in_group's vocab range) and LM head (logits all-gathered
in group order) depend on the position, and they follow `GenCoord.tp` (`GenCoord.tp_for`).
`vllm_rank_order` is the one place the two numberings meet: vLLM's consecutive rank v runs on world
rank vllm_rank_order[v].
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property

Interval = tuple[Fraction, Fraction]


@dataclass(frozen=True)
class TrainCoord:
    tp: int
    pp: int
    dp: int


@dataclass(frozen=True)
class GenCoord:
    tp: int
    """vLLM's tensor-parallel rank: the position in the sorted generation TP group. It decides the vocab
    rows of the embedding and LM head (vLLM gathers the logits in this order)."""
    pp: int
    replica: int
    """Global generation replica (vLLM's external data-parallel index), 0 .. dp·d_g − 1."""
    weight_tp: int
    """The TP slice (0 .. t_g − 1) of every layer's split weights that the rank holds in generation:
    `tp` when t_g ≤ t, the slice inside its training TP slice when t_g > t (module docstring)."""

    def tp_for(self, kind: str) -> int:
        """The TP slice of a rule of `kind` (`models.layouts.KINDS`): `tp` for "vocab", else `weight_tp`."""
        return self.tp if kind == "vocab" else self.weight_tp


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"layout size {name}={value!r} must be a positive integer")


def _overlap(a: list[Interval], b: list[Interval]) -> Fraction:
    return sum(
        (max(Fraction(0), min(a1, b1) - max(a0, b0)) for a0, a1 in a for b0, b1 in b), Fraction(0)
    )


def _nested(train: int, gen: int) -> bool:
    return train % gen == 0 or gen % train == 0


@dataclass(frozen=True)
class ParallelLayout:
    """A validated pair of layouts over `world` ranks. All methods are pure and cheap."""

    world: int
    tp: int
    pp: int
    gen_tp: int
    gen_pp: int = 1
    vpp: int = 1

    def __post_init__(self):
        _check_positive(world=self.world, tp=self.tp, pp=self.pp, vpp=self.vpp, gen_tp=self.gen_tp, gen_pp=self.gen_pp)
        if self.world % (self.tp * self.pp):
            raise ValueError(
                f"train layout tp={self.tp} × pp={self.pp} = {self.tp * self.pp} does not divide the world of "
                f"{self.world} ranks; choose tp·pp dividing {self.world}"
            )
        if self.vpp > 1 and self.pp == 1:
            raise ValueError(f"vpp={self.vpp} needs pp > 1; set vpp=1 or pp>1")
        model_parallel, gen_parallel = self.tp * self.pp, self.gen_tp * self.gen_pp
        if model_parallel % gen_parallel and (gen_parallel % model_parallel or self.world % gen_parallel):
            raise ValueError(
                f"generation layout tp={self.gen_tp} × pp={self.gen_pp} = {gen_parallel} does not divide the "
                f"training tp·pp = {model_parallel}, nor is it a multiple of it dividing the world of {self.world}; "
                f"pick gen tp·pp dividing {model_parallel}, or a multiple of {model_parallel} dividing {self.world}"
            )
        if not _nested(self.tp, self.gen_tp) or not _nested(self.pp, self.gen_pp):
            raise ValueError(
                f"generation tp={self.gen_tp}, pp={self.gen_pp} must each divide or be a multiple of the "
                f"training tp={self.tp}, pp={self.pp}"
            )

    @classmethod
    def create(cls, world: int, tp: int, pp: int, gen_tp: int | None = None, gen_pp: int = 1,
               vpp: int = 1, dp: int | None = None) -> "ParallelLayout":
        """Like the constructor, but checks an explicit dp against the world (t·p·d = world)."""
        if dp is not None:
            _check_positive(tp=tp, pp=pp, dp=dp)
            if tp * pp * dp != world:
                raise ValueError(
                    f"train layout tp={tp} × pp={pp} × dp={dp} = {tp * pp * dp} but the world has {world} ranks; "
                    f"make tp·pp·dp equal {world}"
                )
        return cls(world=world, tp=tp, pp=pp, gen_tp=tp if gen_tp is None else gen_tp, gen_pp=gen_pp, vpp=vpp)

    # --- sizes -------------------------------------------------------------------------------------
    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def micro_dp(self) -> int:
        """d_g = t·p/(t_g·p_g): ranks of a training replica that hold one generation shard between them
        (HybridFlow's micro-DP size); 1 when a generation replica spans several training replicas."""
        return max(1, self.tp * self.pp // (self.gen_tp * self.gen_pp))

    @property
    def train_replicas_per_gen(self) -> int:
        """Training replicas one generation replica spans: (t_g·p_g)/(t·p) when t_g·p_g > t·p, else 1."""
        return max(1, self.gen_tp * self.gen_pp // (self.tp * self.pp))

    @property
    def num_gen_replicas(self) -> int:
        return self.world // (self.gen_tp * self.gen_pp)

    tp_enabled = property(lambda self: self.tp > 1)
    pp_enabled = property(lambda self: self.pp > 1)
    dp_enabled = property(lambda self: self.dp > 1)
    vpp_enabled = property(lambda self: self.vpp > 1)
    gen_tp_enabled = property(lambda self: self.gen_tp > 1)
    gen_pp_enabled = property(lambda self: self.gen_pp > 1)

    # --- training coordinates (Megatron order tp-cp-ep-dp-pp) ----------------------------------------
    def train_coord(self, rank: int) -> TrainCoord:
        self._check_rank(rank)
        return TrainCoord(tp=rank % self.tp, dp=(rank // self.tp) % self.dp, pp=rank // (self.tp * self.dp))

    def rank_of(self, tp: int, pp: int, dp: int) -> int:
        return tp + self.tp * (dp + self.dp * pp)

    def _groups(self, key) -> list[list[int]]:
        out: dict = {}
        for r in range(self.world):
            out.setdefault(key(r), []).append(r)
        return sorted(out.values())  # each group ascending; groups ordered by their lowest rank

    @cached_property
    def tp_groups(self) -> list[list[int]]:
        return self._groups(lambda r: (self.train_coord(r).dp, self.train_coord(r).pp))

    @cached_property
    def pp_groups(self) -> list[list[int]]:
        return self._groups(lambda r: (self.train_coord(r).dp, self.train_coord(r).tp))

    @cached_property
    def dp_groups(self) -> list[list[int]]:
        return self._groups(lambda r: (self.train_coord(r).pp, self.train_coord(r).tp))

    @cached_property
    def model_parallel_groups(self) -> list[list[int]]:
        """The training replicas: the t·p ranks that share one dp index."""
        return self._groups(lambda r: self.train_coord(r).dp)

    # --- generation coordinates ------------------------------------------------------------------------
    def _ideal(self, rank: int) -> GenCoord:
        """The best generation shard for `rank`, before vLLM's sorted-group rule is applied."""
        c = self.train_coord(rank)
        if self.gen_tp <= self.tp:
            spare_t, tg, grow_t = self.tp // self.gen_tp, c.tp // (self.tp // self.gen_tp), 1
            a = c.tp % spare_t
        else:
            spare_t, tg, grow_t, a = 1, c.tp * (self.gen_tp // self.tp), self.gen_tp // self.tp, 0
        if self.gen_pp <= self.pp:
            spare_p, pg, grow_p = self.pp // self.gen_pp, c.pp // (self.pp // self.gen_pp), 1
            b = c.pp % spare_p
        else:
            spare_p, pg, grow_p, b = 1, c.pp * (self.gen_pp // self.pp), self.gen_pp // self.pp, 0
        # which of the spare positions it is: 0 .. spare_t·spare_p·k − 1, with the k training replicas
        # of one generation replica (t_g·p_g > t·p) side by side
        k = self.train_replicas_per_gen
        spare = a + spare_t * b + spare_t * spare_p * (c.dp % k)
        tg, rest = tg + spare % grow_t, spare // grow_t  # grown axes take the spare positions first
        pg, micro = pg + rest % grow_p, rest // grow_p
        return GenCoord(tp=tg, pp=pg, replica=(c.dp // k) * self.micro_dp + micro, weight_tp=tg)

    @cached_property
    def _gen_coords(self) -> tuple[GenCoord, ...]:
        ideal = [self._ideal(r) for r in range(self.world)]
        # vLLM's rule: a rank's coordinate is its sorted position in its group (see module docstring).
        tp_sets = self._groups(lambda r: (ideal[r].replica, ideal[r].pp))
        tg = {r: i for g in tp_sets for i, r in enumerate(g)}
        pp_sets = self._groups(lambda r: (ideal[r].replica, tg[r]))
        pg = {r: i for g in pp_sets for i, r in enumerate(g)}
        # the per-layer weights keep the ideal slice (any permutation of TP slices computes the same)
        coords = tuple(GenCoord(tp=tg[r], pp=pg[r], replica=ideal[r].replica, weight_tp=ideal[r].tp)
                       for r in range(self.world))
        # the sorted TP and PP groups must still tile each replica as one grid
        check = self._groups(lambda r: (coords[r].replica, coords[r].pp))
        if sorted(map(tuple, check)) != sorted(map(tuple, tp_sets)):
            raise ValueError(f"no consistent generation grouping for {self.describe()}; use gen pp=1")
        return coords

    def gen_coord(self, rank: int) -> GenCoord:
        self._check_rank(rank)
        return self._gen_coords[rank]

    @cached_property
    def gen_tp_groups(self) -> list[list[int]]:
        """vLLM tensor-parallel groups, each sorted; position in the list = generation tp rank."""
        return self._groups(lambda r: (self.gen_coord(r).replica, self.gen_coord(r).pp))

    @cached_property
    def gen_pp_groups(self) -> list[list[int]]:
        return self._groups(lambda r: (self.gen_coord(r).replica, self.gen_coord(r).tp))

    @cached_property
    def gen_replica_groups(self) -> list[list[int]]:
        return self._groups(lambda r: self.gen_coord(r).replica)

    @cached_property
    def micro_dp_groups(self) -> list[list[int]]:
        """Ranks of one training replica that hold the same generation shard (size d_g each)."""
        return self._groups(lambda r: (self.train_coord(r).dp, self.gen_coord(r).pp, self.gen_coord(r).weight_tp))

    @cached_property
    def vllm_rank_order(self) -> list[int]:
        """World rank of vLLM's consecutive rank v = tg + t_g·(pg + p_g·replica)."""
        order = [0] * self.world
        for r in range(self.world):
            g = self.gen_coord(r)
            order[g.tp + self.gen_tp * (g.pp + self.gen_pp * g.replica)] = r
        return order

    def vllm_groups(self, consecutive_groups: list[list[int]]) -> list[list[int]]:
        """vLLM's groups (lists of its consecutive ranks) as sorted lists of world ranks."""
        return [sorted(self.vllm_rank_order[v] for v in g) for g in consecutive_groups]

    # --- shards and traffic --------------------------------------------------------------------------
    def train_shard(self, rank: int) -> tuple[Interval, list[Interval]]:
        """(TP interval, layer intervals) of the unit model square that `rank` trains."""
        c = self.train_coord(rank)
        chunks = self.pp * self.vpp
        layers = [(Fraction(v * self.pp + c.pp, chunks), Fraction(v * self.pp + c.pp + 1, chunks)) for v in range(self.vpp)]
        return (Fraction(c.tp, self.tp), Fraction(c.tp + 1, self.tp)), layers

    def gen_shard(self, rank: int) -> tuple[Interval, list[Interval]]:
        """(TP interval of the per-layer weights, layer intervals) of the unit square `rank` generates with."""
        g = self.gen_coord(rank)
        return (Fraction(g.weight_tp, self.gen_tp), Fraction(g.weight_tp + 1, self.gen_tp)), [(Fraction(g.pp, self.gen_pp), Fraction(g.pp + 1, self.gen_pp))]

    def held_fraction(self, rank: int) -> Fraction:
        """Part of the model (fraction of M) that is both in the rank's training and generation shard."""
        (t0, l0), (t1, l1) = self.train_shard(rank), self.gen_shard(rank)
        return _overlap([t0], [t1]) * _overlap(l0, l1)

    def recv_fraction(self, rank: int) -> Fraction:
        """Bytes `rank` receives in one reshard, as a fraction of M: its generation shard minus what it holds."""
        return Fraction(1, self.gen_tp * self.gen_pp) - self.held_fraction(rank)

    def shard_inside_gen(self, rank: int) -> bool:
        return self.held_fraction(rank) == Fraction(1, self.tp * self.pp)

    def formula_recv_fraction(self) -> Fraction:
        """HybridFlow's (d_g − 1)/(t·p); it is every rank's `recv_fraction` when `formula_applies`."""
        return Fraction(self.micro_dp - 1, self.tp * self.pp)

    def min_recv_fraction(self) -> Fraction:
        """The least the worst-placed rank can receive, over every choice of generation shard.

        With vpp = 1 or p_g = 1 it is 1/(t_g·p_g) − 1/(max(t, t_g)·max(p, p_g)) for every rank (module
        docstring), every rank's `recv_fraction` equals it when p_g = 1, and it is `formula_recv_fraction`
        when t_g | t and p_g | p. With interleaved stages (vpp > 1) against several generation stages a
        rank's chunks straddle stages and hold less: then it is computed shard by shard.
        """
        shard = Fraction(1, self.gen_tp * self.gen_pp)
        if self.vpp == 1 or self.gen_pp == 1:
            return shard - Fraction(1, max(self.tp, self.gen_tp) * max(self.pp, self.gen_pp))
        slots = [([(Fraction(g, self.gen_tp), Fraction(g + 1, self.gen_tp))],
                  [(Fraction(s, self.gen_pp), Fraction(s + 1, self.gen_pp))])
                 for g in range(self.gen_tp) for s in range(self.gen_pp)]
        return max(shard - max(_overlap([tp_iv], tps) * _overlap(layers, stage) for tps, stage in slots)
                   for tp_iv, layers in map(self.train_shard, range(self.world)))

    @property
    def formula_applies(self) -> bool:
        """t_g | t and p_g | p (and no virtual stages split across generation stages)."""
        return self.tp % self.gen_tp == 0 and self.pp % self.gen_pp == 0 and (self.vpp == 1 or self.gen_pp == 1)

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} is outside the world of {self.world} ranks")

    # --- reporting -------------------------------------------------------------------------------------
    def describe(self) -> str:
        vpp = f",vpp={self.vpp}" if self.vpp > 1 else ""
        return (f"world={self.world} train tp={self.tp},pp={self.pp},dp={self.dp}{vpp} → "
                f"gen tp={self.gen_tp},pp={self.gen_pp} (d_g={self.micro_dp}, {self.num_gen_replicas} replicas)")

    def rank_table(self) -> list[dict]:
        rows = []
        for r in range(self.world):
            c, g = self.train_coord(r), self.gen_coord(r)
            micro = next(grp for grp in self.micro_dp_groups if r in grp)
            rows.append({
                "rank": r,
                "train": {"tp": c.tp, "pp": c.pp, "dp": c.dp},
                "gen": {"tp": g.tp, "pp": g.pp, "replica": g.replica, "weight_tp": g.weight_tp},
                "micro_dp_group": micro,
                "gen_tp_group": next(grp for grp in self.gen_tp_groups if r in grp),
                "recv_fraction": float(self.recv_fraction(r)),
                "recv_fraction_exact": str(self.recv_fraction(r)),
                "train_shard_inside_gen_shard": self.shard_inside_gen(r),
            })
        return rows

    def to_json(self) -> str:
        return json.dumps({
            "world": self.world,
            "train": {"tp": self.tp, "pp": self.pp, "dp": self.dp, "vpp": self.vpp},
            "gen": {"tp": self.gen_tp, "pp": self.gen_pp, "micro_dp": self.micro_dp, "replicas": self.num_gen_replicas},
            "formula_recv_fraction": float(self.formula_recv_fraction()) if self.formula_applies else None,
            "min_recv_fraction": float(self.min_recv_fraction()),
            "min_recv_fraction_exact": str(self.min_recv_fraction()),
            "vllm_rank_order": self.vllm_rank_order,
            "ranks": self.rank_table(),
        }, indent=1)

    def to_table(self) -> str:
        lines = [self.describe(),
                 f"{'rank':>4} | {'train tp pp dp':>14} | {'gen tp pp rep':>13} | {'micro-DP group':<18} | recv/M",
                 "-" * 72]
        permuted = False
        for row in self.rank_table():
            t, g = row["train"], row["gen"]
            gen_tp = str(g["tp"]) if g["weight_tp"] == g["tp"] else f"{g['tp']}({g['weight_tp']})"
            permuted |= g["weight_tp"] != g["tp"]
            lines.append(f"{row['rank']:>4} | {t['tp']:>6} {t['pp']:>3} {t['dp']:>3} | {gen_tp:>6} {g['pp']:>2} {g['replica']:>3} | "
                         f"{','.join(map(str, row['micro_dp_group'])):<18} | {row['recv_fraction_exact']}")
        total = sum(self.recv_fraction(r) for r in range(self.world))
        if self.formula_applies:
            lines.append(f"each rank receives (d_g−1)/(t·p) = {self.formula_recv_fraction()} of the model M; "
                         f"all ranks together {total}·M")
        else:
            lines.append(f"gen shards do not contain training shards here: each rank receives what it lacks; the "
                         f"worst-placed rank at least {self.min_recv_fraction()} of M (1/(t_g·p_g) − "
                         f"1/(max(t,t_g)·max(p,p_g)) when vpp = 1 or p_g = 1); all ranks together {total}·M")
        if permuted:
            lines.append("gen tp a(b): vLLM TP rank a (vocab rows) holding slice b of every layer's heads and MLP columns")
        return "\n".join(lines)
