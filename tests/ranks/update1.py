"""The (t,p,d) = (1,1,1) reference of one actor update (see update_common.py)."""
from tests.multirank import rank_check
from tests.ranks.update_common import update


@rank_check
def actor_update_at_1_1_1():
    update(1, 1, world=1)


@rank_check
def policy_update_moves_towards_the_advantage():
    from tests.ranks.update_common import update_moves_towards_the_advantage

    update_moves_towards_the_advantage()
