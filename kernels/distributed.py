"""Sequence parallelism for the linear kernels: LASP-2 and its window hybrid (LASP-2H).

Sun et al., "LASP-2: Rethinking Sequence Parallelism for Linear Attention and Its
Hybrid", arXiv 2502.07563. The sequence is cut into contiguous slices, one per rank of a
torch.distributed process group, in rank order (any lengths; `local_slice` gives the
balanced split, lengths differing by at most one). Each rank calls the function below on
its slice (B, T_r, H, D) and gets its slice of the output:

    linear_attention(q, k, v, *, decay=None, normalize=False, ..., group=None)
    gated_linear_attention(q, k, v, g, *, ..., group=None)        -> (o, final_state | None)
    window_linear_attention(q, k, v, fq, fk, *, window, gamma, ..., group=None) -> o

Same arguments and results as the single-device functions of linbench.kernels (minus
initial_state and cu_seqlens), plus `group` (None: the default group).

Forward (linear, GLA). Every rank runs the local kernel on its slice from a zero state:
the intra-slice output and the slice's memory state M_r = sum_t (decay from t to the
slice end) k_t v_t^T, plus the slice's total log-decay a_r (per head, or per channel for
GLA). ONE all-gather of [M_r, a_r] (B, H, K, V + 1); then each rank combines the prefix
P_r = sum_{s<r} exp(a_{s+1} + ... + a_{r-1}) M_s by the recurrence P_{s+1} = e^{a_s} P_s
+ M_s, and adds the inter-slice part scale (q_t e^{G_t}) P_r (G_t: log-decay from the
slice start to t). normalize=True rides [v, 1] through all of it and divides at the end.
The final state (state after the whole sequence, P_W) is returned on every rank.

Backward (`_PrefixState`, an autograd.Function): the gradient of rank r's state M_r comes
from the ranks after it. ONE all-gather of the ranks' prefix-state gradients dP_s (and
of the final-state gradient), then a reverse prefix combine: adj_W = sum_r dP_W,r,
adj_s = dP_s + e^{a_s} adj_{s+1}; dM_r = adj_{r+1} and da_r = sum_V(adj_{r+1} e^{a_r} P_r).
Everything else is local autograd through the local kernels. Communication per call:
one (B, H, K, V + 1) state per rank forward and backward, independent of T.

Window hybrid (LoLCATs: softmax over the last `window` keys, linear attention on older
keys, one shared normalizer). A halo exchange gives each rank the `window` keys, values
and key features before its slice (one all-gather of every rank's last `window` tokens,
so a halo may span several short slices; its backward is a reduce-scatter that returns
the halo gradients to their owners). The linear part's prefix state P_r = sum over
tokens j < t0 - window of fk_j [v_j, 1]^T (t0: the slice start) goes through
`_PrefixState` as above (no decay). The local call is the single-device kernel (any
backend) continued from the state (P_r, halo), as a chunked prefill continues from a
WindowState (`initial_state`): the halo's keys in front of the slice with zero queries
whose outputs are dropped, P_r the starting linear sum of every query. Exact for any
feature map. Collectives: three forward (slice lengths, halo, prefix state), two backward.

Conventions. Gradients follow the data-parallel rule: the loss is the sum of the ranks'
losses, every rank runs backward, and a parameter shared by all ranks (decay, gamma)
gets its per-rank partial gradient (all-reduce it, as DistributedDataParallel does). The
final state is the same tensor on every rank: use it in one rank's loss. Every rank must
make the same calls in the same order (they are collectives). Outputs keep v's dtype;
the inter-slice part and the states are fp32.

Not covered: the delta rule. Its state is not a sum of per-slice states: each slice maps
the incoming state through a (K, K) transition matrix prod_t (I - beta_t k_t k_t^T), so
the prefix needs a sequential chain (or an all-gather of K x K matrices and their
products), not one all-gather of states; `delta_rule` raises NotImplementedError.

Backends: gloo (CPU, tests) and NCCL (GPU) both support all_gather_into_tensor and
reduce_scatter_tensor (all_gather_single / reduce_scatter_single in newer torch).

Benchmark: `python -m linbench.kernels.distributed --nproc 4 --seqlen 1M..8M [--op gla]
[--mode fwdbwd]` launches the ranks with torch's elastic launcher (fresh processes per
row) and prints tokens/s and peak memory per rank beside the one-process row;
`benchmark(nproc, T, ...)` is the same measurement as a function.
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

import linbench.kernels as single
from linbench.kernels.common import (acc_dtype, augment_ones, check_positive, check_shapes,
                                     default_scale, normalize_output)


def local_slice(T: int, group=None) -> slice:
    """This rank's contiguous part of T tokens: balanced, lengths differ by at most one."""
    W, r = dist.get_world_size(group), dist.get_rank(group)
    base, extra = divmod(T, W)
    start = r * base + min(r, extra)
    return slice(start, start + base + (r < extra))


# torch >= 2.13 names them *_single (the *_tensor names are deprecated aliases)
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    """(W, *x.shape): x from every rank of the group, stacked in rank order."""
    out = x.new_empty(dist.get_world_size(group) * x.numel())
    _ALL_GATHER(out, x.reshape(-1), group=group)
    return out.view(-1, *x.shape)


def _lengths(T: int, device, group) -> list[int]:
    """Every rank's slice length."""
    return [int(n) for n in _gather(torch.tensor([T], device=device), group)[:, 0].tolist()]


class _Gather(torch.autograd.Function):
    """Differentiable all-gather: forward stacks x of every rank; backward sums each
    rank's gradient of the stack and hands every rank the part for its own x
    (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather(x, group)

    @staticmethod
    def backward(ctx, dy):
        dx = dy.new_empty(dy[0].numel())
        _REDUCE_SCATTER(dx, dy.reshape(-1), group=ctx.group)
        return dx.view(dy.shape[1:]), None


class _PrefixState(torch.autograd.Function):
    """LASP-2's collective: (M_r, a_r) of every rank -> (P_r, P_W).

    M: (B, H, K, V) fp32 slice state; a: None (no decay) or (B, H, K, 1) fp32 log-decay of
    the whole slice. P_r = sum_{s<r} exp(a_{s+1..r-1}) M_s; P_W: the state after the last
    rank. One all-gather forward, one all-gather backward (see the module docstring).
    """

    @staticmethod
    def forward(ctx, M, a, group):
        V, r = M.shape[-1], dist.get_rank(group)
        packed = _gather(M if a is None else torch.cat([M, a], -1), group)  # (W, B, H, K, V[+1])
        Ms = packed[..., :V]
        As = None if a is None else packed[..., V:].exp()  # (W, B, H, K, 1) slice decays
        P = torch.zeros_like(M)
        for s in range(packed.shape[0]):
            if s == r:
                P_r = P  # the state at the start of this rank's slice
            P = Ms[s] + (P if As is None else As[s] * P)
        ctx.save_for_backward(P_r, As)
        ctx.group, ctx.r = group, r
        return P_r, P

    @staticmethod
    def backward(ctx, dP_r, dP_W):
        P_r, As = ctx.saved_tensors
        r, V = ctx.r, dP_r.shape[-1]
        d = _gather(torch.cat([dP_r, dP_W], -1), group=ctx.group)  # (W, B, H, K, 2V)
        adj = d[..., V:].sum(0)  # adjoint of P_W: every rank's final-state gradient
        for s in range(d.shape[0] - 1, r, -1):  # adj_s = dP_s + e^{a_s} adj_{s+1}
            adj = d[s, ..., :V] + (adj if As is None else As[s] * adj)
        dM = adj  # adj_{r+1}: P_{r+1} = e^{a_r} P_r + M_r
        da = None if As is None else (adj * As[r] * P_r).sum(-1, keepdim=True)
        return dM, da, None


def _inter(q, log_gate_cum, P, scale):
    """Inter-slice output scale (q_t e^{G_t}) P_r in fp32; G: None or (B, T, H, 1 | K)."""
    qf = q.to(P.dtype)
    if log_gate_cum is not None:
        qf = qf * log_gate_cum.exp()
    return torch.einsum("bthk,bhkv->bthv", qf, P * scale)


def linear_attention(q, k, v, *, decay=None, normalize=False, scale=None, eps=1e-6,
                     output_final_state=False, chunk_size=64, backend="auto", group=None):
    """Sequence-parallel causal linear attention (LASP-2): this rank's slice of
    linbench.kernels.linear_attention (fixed per-head log-decay (H,), optional normalizer).
    Returns (o (B, T_r, H, V), final state (B, H, K, V[+1]) on every rank or None)."""
    check_shapes(q, k, v)
    dt, scale = acc_dtype(q), default_scale(q, scale)
    B, T, H, Kd = q.shape
    vv = augment_ones(v.to(dt)) if normalize else v
    o, M = single.linear_attention(q, k, vv, decay=decay, scale=scale, output_final_state=True,
                                   chunk_size=chunk_size, backend=backend)
    a = G = None
    if decay is not None:
        ld = decay.to(torch.float32).view(1, H, 1, 1)
        a = (ld * T).expand(B, H, Kd, 1)
        pos = torch.arange(1, T + 1, device=q.device, dtype=torch.float32)
        G = ld.view(1, 1, H, 1) * pos.view(1, T, 1, 1)  # (1, T, H, 1): decay from slice start
    P, final = _PrefixState.apply(M, a, group)
    o = o.to(dt) + _inter(q, G, P, scale).to(dt)
    if normalize:
        o = normalize_output(o, eps)
    return o.to(v.dtype), (final if output_final_state else None)


def gated_linear_attention(q, k, v, g, *, scale=None, output_final_state=False, chunk_size=64,
                           backend="auto", group=None):
    """Sequence-parallel GLA (LASP-2): this rank's slice of
    linbench.kernels.gated_linear_attention; g (B, T_r, H, K) per-channel log-gates."""
    check_shapes(q, k, v, g=(g, q.shape))
    dt, scale = acc_dtype(q), default_scale(q, scale)
    o, M = single.gated_linear_attention(q, k, v, g, scale=scale, output_final_state=True,
                                         chunk_size=chunk_size, backend=backend)
    G = g.to(torch.float32).cumsum(1)  # (B, T, H, K) log-gate from the slice start to t
    if G.shape[1]:
        a = G[:, -1].unsqueeze(-1)  # (B, H, K, 1)
    else:
        a = G.new_zeros(G.shape[0], G.shape[2], G.shape[3], 1)
    P, final = _PrefixState.apply(M, a, group)
    o = o.to(dt) + _inter(q, G, P, scale).to(dt)
    return o.to(v.dtype), (final if output_final_state else None)


def delta_rule(*args, **kwargs):
    """Not covered by LASP-2: see the module docstring."""
    raise NotImplementedError(
        "delta_rule has no sequence-parallel form here: its state is not a sum of per-slice "
        "states (each slice maps the incoming state through a K x K transition matrix "
        "prod (I - beta k k^T)), so the prefix needs a sequential chain of transition "
        "matrices, not one all-gather of states; run it on one device")


def _halo(x, window: int, lens: list[int], group):
    """The `window` tokens before this rank's slice, (B, h, H, C) with h = min(window, t0),
    from one differentiable all-gather of every rank's last `window` tokens."""
    B, T, H, C = x.shape
    tail = x[:, max(T - window, 0):]
    tail = torch.cat([tail, tail.new_zeros(B, window - tail.shape[1], H, C)], 1)
    every = _Gather.apply(tail, group)  # (W, B, window, H, C)
    r = dist.get_rank(group)
    # the empty first slice keeps rank 0's halo in the graph (its backward is a collective)
    parts = [every[0, :, :0]] + [every[s, :, :min(window, lens[s])] for s in range(r)]
    return torch.cat(parts, 1)[:, -window:]


def window_linear_attention(q, k, v, fq, fk, *, window=64, gamma, scale=None, eps=1e-6,
                            chunk_size=64, backend="auto", group=None):
    """Sequence-parallel LoLCATs window + linear hybrid (LASP-2H): this rank's slice of
    linbench.kernels.window_linear_attention. fq, fk: (B, T_r, H, F); gamma (H,)."""
    check_shapes(q, k, v)
    check_positive(window=window)
    W = int(window)
    dt = acc_dtype(q, k, v, fq, fk)
    B, T, H, Kd = q.shape
    V, Fd = v.shape[-1], fk.shape[-1]
    lens = _lengths(T, q.device, group)
    t0 = sum(lens[:dist.get_rank(group)])
    halo = _halo(torch.cat([k.to(dt), v.to(dt), fk.to(dt)], -1), W, lens, group)  # (B, h, H, K+V+F)
    h = halo.shape[1]
    k_h, v_h, fk_h = halo.split([Kd, V, Fd], -1)
    # this rank's share of the prefix: the keys of [t0 - h, t0 + T - W), halo then slice
    n = max(0, h + T - W)
    M = torch.einsum("bthf,bthv->bhfv", fk_h[:, :n], augment_ones(v_h[:, :n]))  # (B, H, F, V+1)
    if n > h:
        M = M + torch.einsum("bthf,bthv->bhfv", fk[:, :n - h].to(dt), augment_ones(v[:, :n - h].to(dt)))
    # P: every key before the halo (zeros where the halo reaches token 0). The single-device
    # hybrid continues from the state (P, halo) as a prefill continues from its WindowState
    P, _ = _PrefixState.apply(M, None, group)
    y = single.window_linear_attention(q, k, v, fq, fk, window=W, gamma=gamma,
                                       scale=default_scale(q, scale), eps=eps,
                                       initial_state=single.WindowState(P, k_h, v_h, fk_h),
                                       chunk_size=chunk_size, backend=backend)
    return y.to(v.dtype)


# ---------------------------------------------------------------------------------------
# Benchmark: python -m linbench.kernels.distributed --nproc 4 --seqlen 1M..8M

def _lengths_arg(text: str) -> list[int]:
    """'1M..8M' -> powers of two from 1M to 8M; '256k,1M'; '4096'. k, M: 2^10, 2^20."""
    def one(tok):
        tok = tok.strip()
        mult = {"k": 1 << 10, "K": 1 << 10, "M": 1 << 20}.get(tok[-1:], 1)
        n = int(tok[:-1] if mult > 1 else tok) * mult
        if n < 1:
            raise ValueError(tok)
        return n
    out = []
    try:
        for item in text.split(","):
            if ".." in item:
                lo, hi = (one(x) for x in item.split(".."))
                while lo <= hi:
                    out.append(lo)
                    lo *= 2
            else:
                out.append(one(item))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad --seqlen {text!r}: e.g. '1M..8M', '256k,1M' or '4096'") from None
    return out


def _bench_worker(op: str, T: int, B: int, H: int, D: int, mode: str, repeats: int,
                  threads: int, backend: str):
    """One rank of a launched group (env:// from the elastic launcher); world 1 runs the
    single-device kernel. Returns (seconds per call, peak bytes of this process)."""
    import resource
    import time
    torch.set_num_threads(threads)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        dev = torch.device(f"cuda:{torch.cuda.current_device()}" if cuda else "cpu")
        W = dist.get_world_size()
        sl = local_slice(T)
        n = sl.stop - sl.start
        g = torch.Generator(device=dev).manual_seed(dist.get_rank())
        x = [torch.randn(B, n, H, D, device=dev, generator=g) for _ in range(3)]
        if op == "gla":
            x.append(torch.nn.functional.logsigmoid(torch.randn(B, n, H, D, device=dev, generator=g) + 4))
        x = [t.requires_grad_(mode == "fwdbwd") for t in x]
        fn = {"linear": (single.linear_attention, linear_attention),
              "gla": (single.gated_linear_attention, gated_linear_attention)}[op]
        kw = {} if W == 1 else {"group": None}

        def call():
            with torch.set_grad_enabled(mode == "fwdbwd"):
                o, _ = fn[W > 1](*x, backend=backend, **kw)
                if mode == "fwdbwd":
                    o.sum().backward()
            if cuda:
                torch.cuda.synchronize()
        times = []
        for _ in range(repeats + 1):  # the first call warms up
            dist.barrier()
            t0 = time.perf_counter()
            call()
            dist.barrier()
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() if cuda
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return min(times[1:]), peak
    finally:
        dist.destroy_process_group()


def local_launch_config(nproc: int, monitor_interval: float = 0.5):
    """torch's elastic launcher for `nproc` processes on this machine, as torchrun's
    standalone mode: c10d rendezvous on a free local port, no restarts."""
    import uuid
    from torch.distributed.launcher.api import LaunchConfig
    return LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                        run_id=f"linbench-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
                        rdzv_endpoint="localhost:0", max_restarts=0,
                        monitor_interval=monitor_interval)


def benchmark(nproc: int, T: int, *, op="linear", mode="fwd", batch=1, heads=8, dim=64,
              repeats=2, threads=1, backend="auto") -> tuple[float, int]:
    """(seconds per call, max peak bytes over the ranks) of `op` over T tokens on `nproc`
    fresh processes started by torch's elastic launcher (nproc=1: the one-device kernel)."""
    from torch.distributed.launcher.api import elastic_launch
    res = elastic_launch(local_launch_config(nproc), _bench_worker)(op, T, batch, heads, dim, mode, repeats, threads,
                                             backend)
    return max(r[0] for r in res.values()), max(r[1] for r in res.values())


def main(argv=None) -> None:
    """Tokens/s and peak memory per rank of LASP-2 over --nproc processes beside the
    one-process kernel, for each --seqlen (B x T x H x D fp32 q, k, v of random data).
    Peak memory: CUDA max allocated, or on CPU the process's peak RSS (torch included)."""
    p = argparse.ArgumentParser(prog="python -m linbench.kernels.distributed",
                                description=main.__doc__)
    p.add_argument("--nproc", type=int, default=4)
    p.add_argument("--seqlen", type=_lengths_arg, default=_lengths_arg("1M..8M"))
    p.add_argument("--op", choices=("linear", "gla"), default="linear")
    p.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwd")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--backend", choices=single.BACKENDS, default="auto")
    args = p.parse_args(argv)
    if args.nproc < 2:
        p.error(f"--nproc must be >= 2 (the one-process row is always measured), got {args.nproc}")
    print(f"{args.op} {args.mode}  B={args.batch} H={args.heads} D={args.dim} fp32  "
          f"{args.threads} thread(s) per process")
    print(f"{'T':>10} {'procs':>5} {'tokens/s':>12} {'peak/rank':>10}")
    for T in args.seqlen:
        for nproc in (1, args.nproc):
            try:
                sec, peak = benchmark(nproc, T, op=args.op, mode=args.mode, batch=args.batch,
                                      heads=args.heads, dim=args.dim, repeats=args.repeats,
                                      threads=args.threads, backend=args.backend)
            except Exception as err:  # an OOM-killed worker, most often: keep the row
                print(f"{T:>10} {nproc:>5} {'failed':>12} {type(err).__name__}", flush=True)
                continue
            print(f"{T:>10} {nproc:>5} {T * args.batch / sec:>12.4g} {peak / 2**30:>8.2f}Gi",
                  flush=True)


if __name__ == "__main__":
    main()
