"""Mixers switched to sequence parallelism (methods.mixers.sequence_parallel, LASP-2 ops of
linbench.kernels.distributed): 2 gloo processes, each running the method's kernel-level
mixer on its slice of T tokens, give the one-process mixer's output and, summed over the
ranks, every gradient (inputs and the mixer's parameters)."""
from __future__ import annotations

import pytest
import torch

from linbench import registry
from linbench.methods.mixers import sequence_parallel

METHODS = ["lightning", "hedgehog", "gla", "lolcats"]  # linear, normalized, gated, hybrid
T, H, D, WORLD = 45, 2, 8, 2  # T odd: slices of 23 and 22; T > lolcats' window of 16


def _mixer(name):
    torch.manual_seed(0)
    kw = {"window": 16} if name == "lolcats" else {}
    mixer = registry.methods.get(name)(**kw).mixer(H, D, backend="torch").double()
    with torch.no_grad():  # off the initialization, so no symmetry hides a mistake
        for p in mixer.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1),
                                     dtype=p.dtype))
    return mixer


def _inputs():
    g = torch.Generator().manual_seed(2)
    return [torch.randn(1, T, H, D, generator=g, dtype=torch.float64) for _ in range(3)]


def _grads(mixer, xs, sl):
    xs = [x[:, sl].clone().requires_grad_() for x in xs]
    y = mixer(*xs)
    dy = torch.randn(1, T, H, D, generator=torch.Generator().manual_seed(3), dtype=y.dtype)[:, sl]
    params = [p for p in mixer.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * dy).sum(), xs + params)
    return y.detach(), grads[:3], grads[3:]


def _worker(rank, world, init, out):
    import torch.distributed as dist
    from linbench.kernels.distributed import local_slice
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    res = {}
    for name in METHODS:
        mixer = _mixer(name)
        assert sequence_parallel(mixer) == [type(mixer.mixer).LASP2]
        sl = local_slice(T)
        res[name] = (sl, *_grads(mixer, _inputs(), sl))
    torch.save(res, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp
    tmp = tmp_path_factory.mktemp("sp")
    mp.spawn(_worker, args=(WORLD, f"file://{tmp / 'init'}", str(tmp)), nprocs=WORLD)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


TOL = dict(rtol=1e-5, atol=1e-6)  # fp64 inputs; the per-slice states are fp32 by contract


@pytest.mark.parametrize("name", METHODS)
def test_sequence_parallel_mixer_equals_one_process(ranks, name):
    y, dx, dp = _grads(_mixer(name), _inputs(), slice(0, T))
    sls = [r[name][0] for r in ranks]
    assert [s.stop - s.start for s in sls] == [23, 22]
    torch.testing.assert_close(torch.cat([r[name][1] for r in ranks], 1), y, **TOL)
    for i in range(3):  # q, k, v: each rank holds its slice's gradient
        torch.testing.assert_close(torch.cat([r[name][2][i] for r in ranks], 1), dx[i],
                                   **TOL)
    for j, want in enumerate(dp):  # parameters: the ranks' partial gradients sum to it
        torch.testing.assert_close(sum(r[name][3][j] for r in ranks), want, **TOL)


def test_mixers_without_a_sequence_parallel_form_say_so():
    for name, what in [("deltanet", "DeltaMix"), ("liger", "MixSum"), ("swa", "WindowSoftmax")]:
        mixer = registry.methods.get(name)().mixer(H, D)
        with pytest.raises(ValueError, match=f"{what} has no sequence-parallel form"):
            sequence_parallel(mixer)
