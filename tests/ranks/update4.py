"""One actor update at (t,p,d) = (2,1,2) and (1,2,2) on 4 ranks (see update_common.py)."""
from tests.multirank import rank_check
from tests.ranks.update_common import update


@rank_check
def actor_update_at_2_1_2():
    update(2, 1, world=4)


@rank_check
def actor_update_at_1_2_2():
    update(1, 2, world=4)
