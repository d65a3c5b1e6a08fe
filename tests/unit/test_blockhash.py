from typing import Any

from epp.blockhash import block_digests, external, root_hash


def test_recomputes_the_hashes_real_vllm_published(vllm_kv_frames: list[dict[str, Any]]) -> None:
    checked = 0
    stored = [e for f in vllm_kv_frames for e in f["batch"][1] if e["type"] == "BlockStored"]
    # Only sequences that start at the root can be recomputed from the event alone; chained ones
    # need their parent's digest, which the previous event of the same request gives.
    digests_by_int: dict[int, bytes] = {}
    for e in stored:
        parent = root_hash() if e["parent_block_hash"] is None else digests_by_int.get(e["parent_block_hash"])
        if parent is None:
            continue
        ds = block_digests(e["token_ids"], e["block_size"], parent)
        assert [external(d) for d in ds] == e["block_hashes"]
        for d in ds:
            digests_by_int[external(d)] = d
        checked += len(ds)
    assert checked >= 20


def test_chain_depends_on_every_earlier_block() -> None:
    a = block_digests(list(range(64)), 16, root_hash())
    b = block_digests([99, *range(1, 64)], 16, root_hash())
    assert len(a) == 4
    assert all(x != y for x, y in zip(a, b, strict=True))
    assert block_digests(list(range(64)), 16, root_hash(), start_block=2) != a[2:]  # parent differs
    assert block_digests(list(range(70)), 16, root_hash()) == a  # partial block ignored


def test_extra_keys_and_seed_change_hashes() -> None:
    base = block_digests(list(range(16)), 16, root_hash())
    assert block_digests(list(range(16)), 16, root_hash(), lora=("lora-a", "/adapters/a")) != base
    assert block_digests(list(range(16)), 16, root_hash("1234")) != base


def test_cache_salt_keys_only_the_first_block() -> None:
    from epp.blockhash import extra_keys

    assert extra_keys(None, "s1", 0) == (("cache_salt", "s1"),)
    assert extra_keys(None, "s1", 1) is None
    assert extra_keys(("a", "/p"), "s1", 1) == (("lora", "a", "/p"),)
    salted = block_digests(list(range(32)), 16, root_hash(), cache_salt="s1")
    plain = block_digests(list(range(32)), 16, root_hash())
    assert salted[0] != plain[0]


def test_memoised_hasher_equals_the_plain_computation() -> None:
    from epp.blockhash import BlockHasher, block_hashes

    h = BlockHasher(max_entries=5)
    ids = list(range(100))
    for _ in range(3):  # memo filling, hitting and being cleared
        assert h.hashes(ids, 16) == block_hashes(ids, 16)
        assert h.hashes(ids, 16, ("a", "/p"), "salt") == block_hashes(ids, 16, lora=("a", "/p"), cache_salt="salt")
    assert BlockHasher("7").hashes(ids, 16, max_blocks=2) == block_hashes(ids, 16, seed="7", max_blocks=2)
