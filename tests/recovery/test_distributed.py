"""Distributed runs (linbench.recovery.dist) on this CPU: gloo, 2 processes started once by
torch.multiprocessing.spawn (init_method file://), compared with one process.

One spawn runs, on both ranks: a recovery (attention transfer, replicated; LoRA under
FSDP2) of a tiny linearized Llama at a global batch of 2, the ppl suite on a few
documents, a block-wise transfer (one-layer blocks spread over the ranks), then a runner
job in which rank 1 raises at recovery step 2. The tests below
check what each part left behind.
"""
from __future__ import annotations

import json
import traceback
from pathlib import Path

import pytest
import torch

from linbench.errors import LinbenchError
from linbench.recovery import dist, stages as recovery
from linbench.recovery.corpus import Corpus
from tests.conftest import make_tiny_llama
from tests.recovery.test_recovery import ByteTokenizer, linearized, write_corpus

WORLD = 2
SPEC = "smoke,transfer=384,lora=384,batch=2,seqlen=64,eval=128"  # 3 + 3 steps of 2 x 64
# micro=1: one process runs the per-row forwards the ranks run (training and validation),
# so with the power-of-two loss scaling being exact every gradient, step and weight is
# bit-identical to the 2-rank run
EXACT = SPEC + ",micro=1"
PPL_LIMIT = 3
BLOCKS = "smoke,transfer=256,lora=0,batch=2,seqlen=64,eval=128"  # block-wise stage 1 only


class InjectedCrash(RuntimeError):
    pass


def _recover(tmp: Path, spec: str, ckpt: Path, **overrides):
    method, model = linearized("lolcats", lora_lr=1e-3, **overrides)
    corpus = Corpus(str(tmp / "c.jsonl"), tokenizer=ByteTokenizer(), seqlen=64)
    return recovery.recover(method, model, corpus, spec, checkpoint_dir=ckpt)


def _ppl(tokenizer):
    from linbench.suites.base import RunContext
    from linbench.suites.ppl import Perplexity
    record = Perplexity(context=32).run(make_tiny_llama(), tokenizer,
                                        RunContext(limit=PPL_LIMIT, batch_size=2, progress=False))
    return record[0].metrics, record[0].details["items"]


def _crash_plan(tmp: Path, model_dir: str):
    from linbench import run as runner
    from linbench.suites.base import RunContext
    ctx = RunContext(limit=1, batch_size=1, progress=False)
    return runner.RunPlan(model_dir, ["lolcats"], ["ppl"], ctx, str(tmp / "results"),
                          budget=SPEC, data=str(tmp / "c.jsonl"),
                          checkpoints=str(tmp / "crash_ckpt"))


def _worker(rank: int, world: int, tmp: str, model_dir: str) -> None:
    import torch.distributed as tdist
    torch.set_num_threads(1)
    tmp = Path(tmp)
    tdist.init_process_group("gloo", init_method=f"file://{tmp / 'init'}", rank=rank,
                             world_size=world)
    out = {"writes": []}
    from linbench.methods import io
    save, claim = io.save_pretrained, recovery._claim
    io.save_pretrained = lambda m, path, *a, **k: (out["writes"].append(Path(path).name),
                                                   save(m, path, *a, **k))[1]
    recovery._claim = lambda ckpt, meta: (out["writes"].append("recovery.json"),
                                          claim(ckpt, meta))[1]
    model = _recover(tmp, EXACT, tmp / "ckpt_dist")
    out["stages"] = recovery.stages_of(model)
    out["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    from linbench.assets.models import load_tokenizer
    out["ppl"] = _ppl(load_tokenizer(model_dir))
    writes, out["writes"] = out["writes"], []
    model = _recover(tmp, BLOCKS, tmp / "ckpt_blocks", transfer_blocks=1)
    out["blocks"] = (recovery.stages_of(model), {k: v.clone() for k, v in model.state_dict().items()},
                     out["writes"])
    out["writes"] = writes
    torch.save(out, tmp / f"rank{rank}.pt")
    # a runner job in which rank 1 fails at recovery step 2
    from linbench import run as runner
    from linbench.recovery import train
    clip, calls = train.dist.clip_grads, []

    def crashing(params, max_norm):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            raise InjectedCrash("rank 1 crashed at step 2")
        return clip(params, max_norm)
    train.dist.clip_grads = crashing
    runner.run(_crash_plan(tmp, model_dir), echo=lambda s: None)
    raise AssertionError("the crashing run finished")  # pragma: no cover


@pytest.fixture(scope="module")
def spawned(tmp_path_factory, tiny_model_dir):
    """(tmp dir, [per-rank outputs], the spawn's error text) of the one 2-process spawn."""
    import torch.multiprocessing as mp
    tmp = tmp_path_factory.mktemp("dist")
    write_corpus(tmp / "c.jsonl")
    try:
        mp.spawn(_worker, args=(WORLD, str(tmp), str(tiny_model_dir)), nprocs=WORLD)
        error = ""
    except Exception:  # noqa: BLE001 - the crash at the end is expected
        error = traceback.format_exc()
    outs = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    return tmp, outs, error



def _strip(stages):
    return [{k: v for k, v in s.items() if k not in ("seconds", "parallel")} for s in stages]


def test_recovery_equals_one_process_at_the_same_global_batch(spawned):
    tmp, outs, _ = spawned
    same = _recover(tmp, EXACT, tmp / "ckpt_one")
    # the plain one-process run (both rows in one forward) differs by float rounding only
    plain = recovery.stages_of(_recover(tmp, SPEC, None))
    dist_stages = outs[0]["stages"]
    assert [s.get("parallel") for s in dist_stages] == ["replicate", "fsdp2"]
    assert _strip(dist_stages) == _strip(recovery.stages_of(same))
    for d, p in zip(dist_stages, plain):
        assert len(d["curve"]) == len(p["curve"]) == 3
        for (td, ld), (tp, lp) in zip(d["curve"] + d["val_curve"], p["curve"] + p["val_curve"]):
            assert td == tp and ld == pytest.approx(lp, rel=1e-5, abs=1e-12)
    ref = same.state_dict()
    for rank, out in enumerate(outs):  # every replica ends with the same weights
        assert out["state"].keys() == ref.keys()
        for k, v in out["state"].items():
            assert torch.equal(v, ref[k]), (rank, k)


def test_blockwise_transfer_spreads_blocks_over_ranks_and_equals_one_process(spawned):
    tmp, outs, _ = spawned
    one = _recover(tmp, BLOCKS, tmp / "ckpt_blocks_one", transfer_blocks=1)
    (want,) = recovery.stages_of(one)
    ref = one.state_dict()
    for rank, out in enumerate(outs):
        (stage,), state, writes = out["blocks"]
        assert stage["parallel"] == "blocks" and "parallel" not in want
        # each rank trained its own one of the 2 one-layer blocks, on whole batches
        assert [b["rank"] for b in stage["blocks"]] == [0, 1]
        assert [b["rank"] for b in want["blocks"]] == [0, 0]
        assert writes == (["recovery.json", "transfer.tmp"] if rank == 0 else [])
        assert stage["curve"] == want["curve"] and stage["val_curve"] == want["val_curve"]
        for k, v in state.items():  # every rank stitched every block: the one-process model
            assert torch.equal(v, ref[k]), (rank, k)


def test_only_rank_0_wrote_the_checkpoint_and_it_is_the_one_process_one(spawned):
    tmp, outs, _ = spawned
    a, b = tmp / "ckpt_dist", tmp / "ckpt_one"
    if not b.exists():  # the test above writes it; alone, write it here
        _recover(tmp, EXACT, b)
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*"))  # noqa: E731
    assert files(a) == files(b) and "lora/model.safetensors" in files(a)
    from safetensors.torch import load_file
    ta, tb = load_file(a / "lora" / "model.safetensors"), load_file(b / "lora" / "model.safetensors")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert json.loads((a / "recovery.json").read_text())["budget"]["batch_size"] == 2
    assert [o["writes"] for o in outs] == [["recovery.json", "transfer.tmp", "lora.tmp"], []]


def test_ppl_split_across_ranks_equals_one_process(spawned, smol_tokenizer):
    _, outs, _ = spawned
    metrics, items = _ppl(smol_tokenizer)
    for out in outs:
        assert out["ppl"][0] == metrics and out["ppl"][1] == items
    assert metrics["ppl_wiki"].n > 0 and len(items["lambada_acc"]["ids"]) == PPL_LIMIT


def test_a_crashed_rank_fails_the_run_and_leaves_nothing_half_written(spawned):
    tmp, _, error = spawned
    assert "InjectedCrash: rank 1 crashed at step 2" in error
    assert not list((tmp / "results").rglob("*.json"))  # no record, error or ok
    ckpt = tmp / "crash_ckpt"
    assert not list(ckpt.rglob("model")) and not list(ckpt.rglob("*.state.pt"))
    share = ckpt / "transfer"  # the shared stage-1 root: only the claim's lock file, no stage
    assert not [p for p in ckpt.rglob("*") if p.name in ("transfer", "lora") and p != share]
    assert all(p.suffix == ".lock" for p in share.rglob("*")) if share.exists() else True


def test_the_batch_must_split_over_the_ranks_in_one_line(invoke, tiny_model_dir, tmp_path):
    code, _, err = invoke("run", "--model", str(tiny_model_dir), "--methods", "lolcats",
                          "--suite", "ppl", "--budget", "smoke,batch=3", "--nproc", "2",
                          "--results", str(tmp_path))
    assert code == 2 and err.strip().splitlines() == [
        "linbench: error: recovery batch 3 does not split over --nproc 2 processes: give a "
        "budget batch= that is a multiple of 2"]
    with pytest.raises(LinbenchError, match="batch 4 does not split over --nproc 3"):
        dist.check_batch(4, 3)


def test_the_launcher_runs_python_m_linbench_and_names_a_failed_rank(capfd):
    dist.launch(2, ["--version"])  # two children through torch's elastic launcher
    assert capfd.readouterr().out.count("linbench, version") == 2
    with pytest.raises(LinbenchError) as e:
        dist.launch(2, ["run", "--methods", "softmax"])  # no --suite: the children exit 2
    assert e.value.exit_code == 2 and "--nproc 2: rank " in str(e.value)
    assert "\n" not in str(e.value)


def test_one_process_helpers_are_identities():
    rows = torch.arange(6).view(3, 2)
    assert dist.world().size == 1 and dist.is_writer()
    assert dist.shard_rows(rows) is rows
    assert dist.mean(2.5) == 2.5 and dist.broadcast("x") == "x"
    # the clip shared by both paths follows torch's clip_grad_norm_
    a = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    for p, q in zip(a, b):
        p.grad = torch.randn_like(p) * 3
        q.grad = p.grad.clone()
    norm = dist.clip_grads(a, 1.0)
    ref = float(torch.nn.utils.clip_grad_norm_(b, 1.0))
    assert norm == pytest.approx(ref, rel=1e-6)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
