"""The datastore keeps endpoints in the order they were given, whatever the process's hash seed
(the candidates' order decides ties, so a replay repeats only if it does)."""

from __future__ import annotations

import os
import subprocess
import sys

from epp.datastore.store import Datastore

ADDRESSES = [f"10.0.0.{i}:8000" for i in range(1, 17)]
SHOW = ("from epp.datastore.store import Datastore\n"
        "d = Datastore(staleness=2.0)\n"
        f"d.set_endpoints({ADDRESSES[:8]!r})\n"
        f"d.set_endpoints({ADDRESSES!r})\n"
        "print(','.join(e.address for e in d.snapshot().endpoints))\n")


def test_endpoints_keep_the_order_they_were_given_in() -> None:
    store = Datastore(staleness=2.0)
    store.set_endpoints(ADDRESSES[8:])
    store.set_endpoints(ADDRESSES)
    assert store.addresses() == ADDRESSES[8:] + ADDRESSES[:8]


def test_the_order_does_not_depend_on_the_hash_seed() -> None:
    orders = {subprocess.run([sys.executable, "-c", SHOW], env={**os.environ, "PYTHONHASHSEED": seed},
                             capture_output=True, text=True, check=True).stdout for seed in ("0", "1", "2", "3")}
    assert orders == {",".join(ADDRESSES) + "\n"}
