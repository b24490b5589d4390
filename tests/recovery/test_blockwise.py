"""Block-wise attention transfer (linbench/recovery/blockwise.py): 1-layer blocks equal the
joint stage, blocks of 2 run, stitch, resume and clean up, the cache holds what the
teacher computes, and blocks are spread over ranks exactly once."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from linbench import registry
from linbench.errors import LinbenchError
from linbench.methods.linearize import new_parameters
from linbench.recovery import blockwise
from linbench.recovery import stages as recovery
from linbench.recovery.train import Plan
from tests.conftest import make_tiny_llama

LAYERS, T, STEPS = 4, 32, 4



def linearized(**overrides):
    method = registry.methods.get("hedgehog")(max_grad_norm=0.0, backend="torch", **overrides)
    model = make_tiny_llama(vocab_size=256, num_hidden_layers=LAYERS)
    return method, method.linearize(model)


def data(rows=STEPS, val=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (rows, T), generator=g), torch.randint(0, 256, (val, T), generator=g)


def plan(tmp=None, **kw):
    kw = {"steps": STEPS, "batch": 1, "micro": 1, "eval_steps": STEPS, "patience": 9,
          "save_every": 1, "state_path": tmp / "transfer.state.pt" if tmp else None, **kw}
    return Plan(**kw)


def trained(model) -> dict:
    ids = {id(p) for p in new_parameters(model)}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in ids}


def transfer(method, model, p, **kw):
    return recovery._transfer(method.config, model, *data(**kw), p)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_one_layer_blocks_equal_joint_transfer(loss):
    method, model = linearized(transfer=loss)
    before = trained(model)
    model, joint = transfer(method, model, plan())
    bmethod, bmodel = linearized(transfer_blocks=1, transfer=loss)
    bmodel, blocks = transfer(bmethod, bmodel, plan())
    a, b = trained(model), trained(bmodel)
    assert a.keys() == b.keys() and len(a) >= LAYERS
    for i in range(LAYERS):  # every layer trained...
        assert any(not torch.equal(a[n], before[n]) for n in a if f"layers.{i}." in n), i
    for n in a:              # ...and block-wise exactly as jointly
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-5, msg=n)
    # every block kept its last step (as the joint stage did), so the comparison is fair
    assert joint["kept_initial"] is False and joint["stopped"] == "budget"
    assert [x["best_step"] for x in blocks["blocks"]] == [STEPS] * LAYERS
    assert [x["layers"] for x in blocks["blocks"]] == [[i] for i in range(LAYERS)]
    # the summed block losses are the joint loss, step by step and on held-out rows
    for key in ("curve", "val_curve"):
        torch.testing.assert_close(torch.tensor(blocks[key]), torch.tensor(joint[key]), rtol=1e-5, atol=1e-6)
    assert blocks["ppl_after"] == pytest.approx(joint["ppl_after"], rel=1e-5)


def test_cached_block_inputs_are_the_teachers_hidden_states(tmp_path):
    parent = make_tiny_llama(vocab_size=256, num_hidden_layers=LAYERS)
    ids, _ = data(rows=5)
    with torch.no_grad():
        hidden = parent(input_ids=ids, output_hidden_states=True).hidden_states  # [i]: into layer i
    method, model = linearized()
    row_bytes = T * 64 * 4
    meta = blockwise.write_cache(model, {"train": ids}, [1, 3], tmp_path, plan(micro=2),
                                 shard_bytes=2 * row_bytes)   # 2 rows a shard: 3 shards, last short
    assert meta["shard_rows"] == 2 and meta["rows"] == {"train": 5}
    assert len(list(tmp_path.glob("train.b0.s*.safetensors"))) == 3
    for b, layer in enumerate([1, 3]):
        x = blockwise.inputs(tmp_path, meta, "train", b)
        assert x.shape == (5, T, 64)
        torch.testing.assert_close(x[0:5], hidden[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x[1:4], hidden[layer][1:4], rtol=1e-5, atol=1e-5)  # across shards
    # complete caches are reused (same fingerprint), others rewritten
    stamp = (tmp_path / "train.b0.s0.safetensors").stat().st_mtime_ns
    blockwise.write_cache(model, {"train": ids}, [1, 3], tmp_path, plan(micro=2), shard_bytes=2 * row_bytes)
    assert (tmp_path / "train.b0.s0.safetensors").stat().st_mtime_ns == stamp
    meta = blockwise.write_cache(model, {"train": ids[:3]}, [1, 3], tmp_path, plan(micro=2))
    assert meta["rows"] == {"train": 3} and not (tmp_path / "train.b0.s1.safetensors").exists()


class Stop(Exception):
    pass


def test_two_layer_blocks_run_stitch_resume_and_clean_up(tmp_path, monkeypatch):
    method, model = linearized(transfer_blocks=2)
    before = trained(model)
    model, stage = transfer(method, model, plan(tmp_path / "a"))
    want = trained(model)
    assert [x["layers"] for x in stage["blocks"]] == [[0, 1], [2, 3]]
    payload = 2 * (STEPS + 2) * T * 64 * 4          # 2 blocks x (train + val rows), fp32
    assert stage["transfer_blocks"] == 2 and 0 <= stage["cache_bytes"] - payload < 1024  # + headers
    assert sum(not torch.equal(want[n], before[n]) for n in want) >= LAYERS
    work = tmp_path / "a" / "transfer.blocks"
    assert sorted(f.name for f in work.iterdir()) == [
        "block0.json", "block0.safetensors", "block1.json", "block1.safetensors"]
    # the block files stitch a fresh model into the trained one
    _, fresh = linearized(transfer_blocks=2)
    assert blockwise.stitch(fresh, [work / "block0.safetensors", work / "block1.safetensors"]) == len(want)
    assert all(torch.equal(trained(fresh)[n], want[n]) for n in want)

    # interrupted in block 1 after 2 steps: a rerun keeps block 0, resumes block 1, same result
    seen = []

    def stop(info):
        seen.append(info.step)
        if len(seen) == STEPS + 2:
            raise Stop
    _, model = linearized(transfer_blocks=2)
    with pytest.raises(Stop):
        transfer(method, model, plan(tmp_path / "b", on_step=stop))
    work = tmp_path / "b" / "transfer.blocks"
    assert (work / "block0.safetensors").exists() and (work / "block1.state.pt").exists()
    shard = work / "cache.rank0" / "train.b1.s0.safetensors"   # block 1's first rows
    stamps, write = [shard.stat().st_mtime_ns], blockwise.write_cache

    def write_and_stamp(*args, **kwargs):
        meta = write(*args, **kwargs)
        stamps.append(shard.stat().st_mtime_ns)
        return meta
    monkeypatch.setattr(blockwise, "write_cache", write_and_stamp)
    seen.clear()
    _, model = linearized(transfer_blocks=2)
    model, again = transfer(method, model, plan(tmp_path / "b", on_step=seen.append))
    assert [s.step for s in seen] == [2, 3, 4]   # block 1 from its last saved step (1) on
    assert all(torch.equal(trained(model)[n], want[n]) for n in want)
    assert again["curve"] == stage["curve"]
    assert stamps[0] == stamps[1]                   # the cache was reused, not rewritten
    assert not (work / "cache.rank0").exists() and not (work / "block1.state.pt").exists()


def test_ranks_train_their_own_blocks_and_stitch_all(tmp_path):
    """What each of 2 ranks does (run in turn here): the same model as one process."""
    method, model = linearized(transfer_blocks=1)
    want = trained(transfer(method, model, plan())[0])
    _, model = linearized(transfer_blocks=1)
    train, val = data()
    kw = {"trainable": recovery._trainable, "transfer_mode": recovery._transfer_mode}
    assert blockwise.train_blocks(method.config, model, train, val, plan(), tmp_path, rank=1,
                                  world=2, **kw) == [2, 3]
    with pytest.raises(RuntimeError, match=r"blocks \[0, 1\] of 4 have no trained parameters"):
        blockwise.finish(model, tmp_path, 1)
    _, model = linearized(transfer_blocks=1)       # rank 0: a model of its own
    assert blockwise.train_blocks(method.config, model, train, val, plan(), tmp_path, rank=0,
                                  world=2, **kw) == [0, 1]
    _, stage = blockwise.finish(model, tmp_path, 1)
    assert [x["layers"] for x in stage["blocks"]] == [[0], [1], [2], [3]]
    assert all(torch.equal(trained(model)[n], want[n]) for n in want)
    with pytest.raises(LinbenchError, match="needs a checkpoint dir"):
        blockwise.transfer(method.config, model, train, val, plan(), rank=0, world=2, **kw)


def test_without_a_checkpoint_dir_nothing_is_left_behind(tmp_path, monkeypatch):
    monkeypatch.setattr(blockwise.tempfile, "tempdir", str(tmp_path))
    method, model = linearized(transfer_blocks=3)   # blocks [0, 1, 2] and [3]
    _, stage = transfer(method, model, plan(steps=1))
    assert [x["layers"] for x in stage["blocks"]] == [[0, 1, 2], [3]]
    assert list(tmp_path.iterdir()) == []


def test_blocks_skip_softmax_only_ones_and_spread_over_ranks():
    _, model = linearized(keep_softmax_layers=(2, 3))
    assert blockwise.blocks(model, 2) == [[0, 1]] and blockwise.blocks(model, 1) == [[0], [1]]
    for n in range(0, 9):
        for world in range(1, 5):
            got = [blockwise.blocks_for(n, r, world) for r in range(world)]
            assert sum(got, []) == list(range(n))               # each block once, in order
            assert max(map(len, got)) - min(map(len, got)) <= 1  # balanced
    with pytest.raises(LinbenchError, match="bad rank 2 of world 2"):
        blockwise.blocks_for(4, 2, 2)


def test_the_field_is_checked_and_enters_the_config():
    method = registry.methods.get("lolcats")(transfer_blocks=5)
    assert method.config_dict()["transfer_blocks"] == 5
    assert registry.methods.get("lolcats")().config_dict()["transfer_blocks"] == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(LinbenchError, match=f"transfer_blocks: bad value {bad!r}"):
            dataclasses.replace(method.config, transfer_blocks=bad)
