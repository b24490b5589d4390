"""Sequence parallelism (linbench.kernels.distributed) on gloo process groups of 2 and 4
CPU processes: every case's output, final state and EVERY gradient equal the
single-process kernel's on the whole sequence (fp32).

Spawning processes costs seconds (each imports torch), so 4 processes are spawned once;
each runs every case on the group of 4 and on its group of 2 (torch.distributed.new_group),
over the cases (T not divisible by the world size, decays and gates near 0 and near 1,
normalize on and off, the window hybrid with a halo spanning several ranks and with the
prefix state) and writes its max relative errors; the test asserts on them.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

B, H, K, V, FEAT = 1, 2, 8, 6, 4
TOL = 2e-5  # max |err| / max |reference|, per tensor


def _leaves(T, seed, positive=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, d, generator=g) for d in (K, K, V))
    if positive:  # the normalizer needs positive q.k
        q, k = q.sigmoid(), k.sigmoid()
    return g, q, k, v


def _cases(T, group):
    """name -> (distributed call, single-process call, leaves (full T), names of the leaves
    that are per-token (sliced) -- the others are shared parameters)."""
    import linbench.kernels as single
    import linbench.kernels.distributed as lasp

    cases = {}
    for name, decay, normalize in [("plain", None, False), ("normalize", None, True),
                                   ("decay", [-8.0, -1e-4], False),
                                   ("decay_normalize", [-0.3, -1e-4], True)]:
        g, q, k, v = _leaves(T, len(cases), positive=normalize)
        leaves = {"q": q, "k": k, "v": v}
        if decay is not None:
            leaves["decay"] = torch.tensor(decay)
        kw = dict(normalize=normalize, output_final_state=True, chunk_size=4)
        cases["linear_" + name] = (
            lambda x, kw=kw: lasp.linear_attention(x["q"], x["k"], x["v"], decay=x.get("decay"),
                                                   group=group, **kw),
            lambda x, kw=kw: single.linear_attention(x["q"], x["k"], x["v"], decay=x.get("decay"),
                                                     backend="torch", **kw),
            leaves, ("q", "k", "v"))
    for regime in ("typ", "near0", "near1"):
        g, q, k, v = _leaves(T, 10 + len(cases))
        u = torch.rand(B, T, H, K, generator=g)
        gates = {"typ": torch.nn.functional.logsigmoid(4 * u - 2), "near0": -8 - 2 * u,
                 "near1": -1e-4 * (0.5 + u)}[regime]
        cases["gla_" + regime] = (
            lambda x: lasp.gated_linear_attention(x["q"], x["k"], x["v"], x["g"],
                                                  output_final_state=True, chunk_size=4,
                                                  group=group),
            lambda x: single.gated_linear_attention(x["q"], x["k"], x["v"], x["g"],
                                                    output_final_state=True, chunk_size=4,
                                                    backend="torch"),
            {"q": q, "k": k, "v": v, "g": gates}, ("q", "k", "v", "g"))
    for window in (2, 5):  # 2: the prefix state on later ranks; 5: a halo over several ranks
        g, q, k, v = _leaves(T, 20 + window)
        fq, fk = (torch.rand(B, T, H, FEAT, generator=g) for _ in range(2))
        gamma = torch.sigmoid(torch.randn(H, generator=g))
        kw = dict(window=window, chunk_size=4)
        cases[f"window{window}"] = (
            lambda x, kw=kw: (lasp.window_linear_attention(
                x["q"], x["k"], x["v"], x["fq"], x["fk"], gamma=x["gamma"], group=group,
                **kw), None),
            lambda x, kw=kw: (single.window_linear_attention(
                x["q"], x["k"], x["v"], x["fq"], x["fk"], gamma=x["gamma"], backend="torch",
                **kw), None),
            {"q": q, "k": k, "v": v, "fq": fq, "fk": fk, "gamma": gamma},
            ("q", "k", "v", "fq", "fk"))
    return cases


def _loss(o, final, sl, T, seed=7):
    """sum(o * w) over this slice of a fixed random w (T tokens) (+ the final state's term)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(B, T, H, o.shape[-1], generator=g)
    loss = (o * w[:, sl]).sum()
    if final is not None:
        loss = loss + (final * torch.randn(final.shape, generator=g)).sum()
    return loss


def _err(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _run_cases(T, group, errors, prefix):
    """Every case on `group` (its ranks hold contiguous slices of T tokens)."""
    import torch.distributed as dist

    import linbench.kernels.distributed as lasp
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    sl = lasp.local_slice(T, group)
    for name, (dist_fn, single_fn, leaves, per_token) in _cases(T, group).items():
        full = {n: x.clone().requires_grad_() for n, x in leaves.items()}
        o, final = single_fn(full)
        _loss(o, final, slice(0, T), T).backward()
        part = {n: (x[:, sl] if n in per_token else x).clone().requires_grad_()
                for n, x in leaves.items()}
        o_r, final_r = dist_fn(part)
        # the final state is the same on every rank: it enters the last rank's loss only
        _loss(o_r, final_r if rank == world - 1 else None, sl, T).backward()
        name = prefix + name
        errors[name + ":o"] = _err(o_r, o[:, sl])
        if final is not None:
            errors[name + ":final"] = _err(final_r, final)
        for n, x in part.items():
            grad = x.grad
            if n not in per_token:  # a shared parameter: the ranks' partial gradients add
                dist.all_reduce(grad, group=group)
            ref = full[n].grad[:, sl] if n in per_token else full[n].grad
            errors[f"{name}:d{n}"] = _err(grad, ref)


def _worker(rank, world, init, out_dir):
    """One of WORLD processes: all cases on the whole world (T = 18: slices 5, 5, 4, 4)
    and on its pair {0, 1} or {2, 3} (T = 13: slices 7, 6), through `group`."""
    import torch.distributed as dist

    import linbench.kernels.distributed as lasp
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    errors = {}
    try:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        _run_cases(18, None, errors, "world4/")
        _run_cases(13, pairs[rank // 2], errors, "world2/")
        try:
            lasp.delta_rule(None, None, None, None)
        except NotImplementedError as err:
            errors["delta_rule_refused"] = 0.0 if "transition" in str(err) else 1.0
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(errors, f)


def test_matches_single_process(tmp_path):
    """Outputs, final states and all gradients of every rank == the one-process kernels,
    on a group of 4 processes and on two groups of 2 (the `group` argument)."""
    world = 4
    mp.spawn(_worker, args=(world, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)),
             nprocs=world, join=True)
    for rank in range(world):
        errors = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(errors) == 2 * 54 + 1, sorted(errors)
        bad = {k: v for k, v in errors.items() if not v <= TOL}
        assert not bad, f"rank {rank}: {bad}"


def test_local_slice_is_balanced_and_contiguous(monkeypatch):
    """Slices tile [0, T) in rank order and differ in length by at most one."""
    import torch.distributed as dist

    import linbench.kernels.distributed as lasp
    for world, T in [(4, 18), (3, 2), (2, 13)]:
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
        slices = []
        for r in range(world):
            monkeypatch.setattr(dist, "get_rank", lambda group=None: r)
            slices.append(lasp.local_slice(T))
        assert slices[0].start == 0 and slices[-1].stop == T
        assert all(a.stop == b.start for a, b in zip(slices, slices[1:]))
        lengths = [s.stop - s.start for s in slices]
        assert max(lengths) - min(lengths) <= 1


def test_benchmark_arguments(capsys):
    """--seqlen ranges are powers of two; bad values are one line and exit code 2."""
    import linbench.kernels.distributed as lasp
    assert lasp._lengths_arg("1M..8M") == [1 << 20, 1 << 21, 1 << 22, 1 << 23]
    assert lasp._lengths_arg("256k,4096") == [1 << 18, 4096]
    for argv, bad in [(["--seqlen", "1X"], "'1X'"), (["--nproc", "1"], "--nproc")]:
        with pytest.raises(SystemExit) as exit_:
            lasp.main(argv)
        assert exit_.value.code == 2
        assert bad in capsys.readouterr().err
