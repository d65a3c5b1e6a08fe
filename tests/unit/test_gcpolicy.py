"""``settle`` freezes what a process holds once it serves, after collecting the garbage start-up
left (a subprocess each: freezing is for the whole process)."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import gc, weakref
from epp.gcpolicy import settle

class Node:
    pass

kept = [Node() for _ in range(1000)]
garbage = Node()
garbage.me = garbage  # a cycle only a collection frees
gone = weakref.ref(garbage)
del garbage
frozen = settle()
print(gone() is None, frozen >= 1000, gc.get_freeze_count() == frozen)
after = Node()
after.me = after
later = weakref.ref(after)
del after
gc.collect()
print(later() is None)
"""


def test_settle_collects_start_up_garbage_then_freezes_the_rest_and_later_garbage_is_still_collected() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "True", "True"]
