"""The (t,p,d) = (1,1,1) reference of one actor update (see update_common.py)."""
from tests.multirank import rank_check
from tests.ranks.update_common import update


@rank_check
def actor_update_at_1_1_1():
    update(1, 1, world=1)
