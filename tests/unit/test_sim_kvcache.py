from epp.blockhash import block_digests, external, root_hash
from epp.sim.kvcache import KVCache


def _store(kv: KVCache, tokens: list[int]) -> tuple[list[int], list[bytes]]:
    ds = block_digests(tokens, kv.block_size, root_hash())
    ids = kv.allocate(len(ds))
    assert ids is not None
    kv.store(ids, ds, None, tokens, None)
    return ids, ds


def test_store_hit_and_events() -> None:
    kv = KVCache(8, 4)
    ids, ds = _store(kv, list(range(12)))
    events = kv.take_events()
    assert events == [{
        "type": "BlockStored", "block_hashes": [external(d) for d in ds], "parent_block_hash": None,
        "token_ids": list(range(12)), "block_size": 4, "lora_id": None, "medium": "GPU", "lora_name": None,
        "extra_keys": [None, None, None], "group_idx": 0, "kv_cache_spec_kind": "full_attention"}]
    assert kv.usage() == 3 / 8
    assert kv.longest_hit(ds) == 3
    kv.release(ids)
    assert kv.usage() == 0.0
    assert kv.longest_hit(ds) == 3  # still cached after release
    assert kv.touch(ds[:2]) == ids[:2]


def test_lru_eviction_emits_block_removed_per_block() -> None:
    kv = KVCache(4, 4)
    ids_a, ds_a = _store(kv, list(range(8)))
    kv.release(ids_a)
    ids_b, ds_b = _store(kv, [100 + i for i in range(8)])
    kv.release(ids_b)
    kv.take_events()
    # Two more blocks needed: the least recently freed cached blocks go first (a's tail first).
    got = kv.allocate(2)
    assert got is not None
    removed = kv.take_events()
    assert [e["type"] for e in removed] == ["BlockRemoved", "BlockRemoved"]
    assert {e["block_hashes"][0] for e in removed} == {external(d) for d in ds_a}
    assert kv.longest_hit(ds_a) == 0 and kv.longest_hit(ds_b) == 2


def test_allocation_fails_without_free_blocks_and_reset_needs_idle() -> None:
    kv = KVCache(2, 4)
    ids, _ = _store(kv, list(range(8)))
    assert kv.allocate(1) is None
    assert kv.reset() is False
    kv.release(ids)
    assert kv.reset() is True
    assert kv.take_events()[-1] == {"type": "AllBlocksCleared"}
