"""Mixers: the sequence-mixing part of a linearized layer, built on linbench.kernels.

A mixer is called as `mixer(h: Heads, state, want_state) -> (o, state)`, o (B, T, H, D).
`state=None` starts a sequence (prefill, chunked kernels); with a state and one token it
takes the kernel's decode step, so parallel and token-by-token forms agree. Every mixer
knows its exact-attention `window` (0: none) and its state size in bytes.

Long sequences stream (methods/README.md, "Streaming (long context)"): the recurrent
mixers (LinearMix, GatedMix, DeltaMix) run segments of about STREAM_TOKEN_HEADS
token-heads one after another, the state carried between them (exact: the same
recurrence), each segment recomputed in backward when a gradient is needed
(kernels.common.segmented); so feature maps, gates
and the kernels' compute-dtype copies exist for one segment at a time. The window mixers
stream inside their kernels (linbench.kernels.window), HybridWindow's feature maps
applied there group by group; MixSum runs its parts segment by segment, each with its
state, into one output (without autograd; with it, the parts stream on their own and
their weighted sum is computed segment by segment).

Sequence parallelism (LASP-2, linbench.kernels.distributed): `sequence_parallel(module,
group)` switches every mixer under `module` that has a sequence-parallel op (its `LASP2`:
LinearMix, GatedMix, HybridWindow) to it. Each rank then passes its contiguous slice of
the sequence (kernels.distributed.local_slice) and gets its slice of the output: the same
per-token maps, the distributed op in place of the single-device kernel, no cache.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from linbench import kernels as K
from linbench.kernels.common import segmented
from linbench.kernels.window.reference import window_linear_weights

# Token-heads (B * H * tokens) per segment of a streamed mixer (1M = 128k tokens at B1 H8).
STREAM_TOKEN_HEADS = 1 << 20
# With autograd a segment is recomputed with its graph in backward; that graph (feature
# maps, gates, the kernels' fp32 copies) is the backward's working set, so it is kept
# smaller (2^18 = 32k tokens at B1 H8: ~1 GiB for hedgehog, ~1.6 GiB for deltanet).
STREAM_GRAD_TOKEN_HEADS = 1 << 18


def _segment_len(x, grad: bool = False) -> int:
    """Tokens per segment for (B, T, H, ...) inputs."""
    budget = min(STREAM_TOKEN_HEADS, STREAM_GRAD_TOKEN_HEADS) if grad else STREAM_TOKEN_HEADS
    return max(1, budget // (x.shape[0] * x.shape[2]))


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in tensors)


def _stream(run, h, state, want_state, params=()):
    """run(h, state, want_state) -> (o, state) over segments of h, the state carried; one
    call when h is one segment. `params`: the trainable parameters `run` reads.

    The segments run through `kernels.common.segmented`: one output, and under autograd
    only the fields of h and the state at each segment start are kept; the backward
    recomputes one segment at a time and writes the field gradients into one buffer per
    field (no per-segment full-size gradient, no chain of slice copies)."""
    params = [p for p in params if p.requires_grad]
    fields = [getattr(h, f.name) for f in dataclasses.fields(h)]
    T, seg = h.q.shape[1], _segment_len(h.q, _needs_grad([*fields, state, *params]))
    if T <= seg:
        return run(h, state, want_state)
    kind = type(h)
    o, state = segmented(lambda parts, s: run(kind(*parts), s, True), seg, state, fields,
                         params)
    return o, (state if want_state else None)


def _map(fn, *xs):
    """fn(*xs) for a per-token map fn of (B, T, H, ...) tensors, computed segment by segment
    into one output (no whole-sequence intermediate of fn)."""
    T, seg = xs[0].shape[1], _segment_len(xs[0])
    if T <= seg:
        return fn(*xs)
    return segmented(lambda parts, _: (fn(*parts), None), seg, None, list(xs))[0]


def _steps(step, h, state):
    """Run a multi-token continuation through the decode step, token by token."""
    outs = []
    for t in range(h.q.shape[1]):
        o, state = step(h, t, state)
        outs.append(o)
    return torch.stack(outs, 1), state


def sequence_parallel(module: nn.Module, group=None) -> list[str]:
    """Switch the mixers of `module` (a mixer, a MixerModule, or a model's linearized
    layers; softmax layers are not covered) to their LASP-2 op over `group` (None: the
    default process group); returns the ops. ValueError naming a mixer without one."""
    found = [m.mixer for m in module.modules() if isinstance(getattr(m, "mixer", None), nn.Module)]
    ops = []
    for mixer in found or [module]:
        op = getattr(type(mixer), "LASP2", None)
        if op is None:
            raise ValueError(f"{type(mixer).__name__} has no sequence-parallel form "
                             f"(linbench.kernels.distributed covers {', '.join(_LASP2)})")
        mixer.lasp2_group = (group,)
        ops.append(op)
    return ops


_LASP2 = ("linear_attention", "gated_linear_attention", "window_linear_attention")


def _whole(state, want_state):
    if state is not None or want_state:
        raise ValueError("a sequence-parallel mixer runs whole sequences: no cache in or out")


class LinearMix(nn.Module):
    """Causal linear attention on feature maps, with an optional fixed per-head log-decay
    (Lightning) and the normalizer sum_j phi(q_i).phi(k_j) (Hedgehog)."""

    window = 0
    LASP2 = "linear_attention"
    lasp2_group = None  # (group,) once switched by sequence_parallel

    def __init__(self, fq: nn.Module, fk: nn.Module, *, normalize: bool, log_decay=None,
                 scale: float | None = None, backend: str = "auto"):
        super().__init__()
        self.fq, self.fk, self.normalize, self.scale, self.backend = fq, fk, normalize, scale, backend
        self.register_buffer("log_decay", log_decay, persistent=False)

    def features(self, h):
        return self.fq(h.q), self.fk(h.k)

    def forward(self, h, state, want_state):
        if self.lasp2_group is not None:
            _whole(state, want_state)
            from linbench.kernels import distributed as D
            fq, fk = self.features(h)
            return D.linear_attention(fq, fk, h.v, decay=self.log_decay, normalize=self.normalize,
                                      scale=self.scale, backend=self.backend,
                                      group=self.lasp2_group[0])[0], None
        return _stream(self._run, h, state, want_state, self.parameters())

    def _run(self, h, state, want_state):
        fq, fk = self.features(h)
        kw = dict(decay=self.log_decay, normalize=self.normalize, scale=self.scale)
        if state is not None and fq.shape[1] == 1:
            o, state = K.linear_attention_step(fq[:, 0], fk[:, 0], h.v[:, 0], state, **kw)
            return o[:, None], state
        return K.linear_attention(fq, fk, h.v, **kw, initial_state=state,
                                  output_final_state=want_state, backend=self.backend)

    def weights(self, h, i0: int, i1: int):
        """Normalized attention weights of queries i0..i1 over all keys (B, H, n, T)."""
        fq, fk = self.features(h)
        a = torch.einsum("bihf,bjhf->bhij", fq[:, i0:i1].float(), fk.float())
        T = fk.shape[1]
        causal = torch.arange(T, device=a.device)[None] <= torch.arange(i0, i1, device=a.device)[:, None]
        a = a * causal
        return a / a.sum(-1, keepdim=True).clamp_min(1e-12)

    def state_bytes(self, heads, head_dim, seqlen, elem):
        f = getattr(self.fk, "feature_dim", head_dim)
        return heads * f * (head_dim + int(self.normalize)) * 4


class LowRankGate(nn.Module):
    """GLA's data-dependent forget gate (arXiv 2312.06635, sec. 4.4):
    g = logsigmoid(W2 W1 x + b) / tau, rank 16, tau 16 -> (B, T, H, D) log-gates."""

    def __init__(self, hidden: int, heads: int, head_dim: int, rank: int = 16, tau: float = 16.0):
        super().__init__()
        self.down = nn.Linear(hidden, rank, bias=False)
        self.up = nn.Linear(rank, heads * head_dim, bias=True)
        self.tau, self.shape = tau, (heads, head_dim)

    def forward(self, h):
        g = F.logsigmoid(self.up(self.down(h.x)).float()) / self.tau
        return g.view(*h.x.shape[:2], *self.shape)


class KeyGate(nn.Module):
    """Liger's gate from the pretrained key projection (arXiv 2503.01496, Table 1), as a
    log-gate (B, T, H, D) <= 0. The pooling of the reference code is an identity.

    gla:    logsigmoid(k) / tau          (the reference code's default, tau = 16)
    mamba2: -softplus(k)                 (decay exp(-softplus(k)))
    hgrn2:  log(c + (1 - c) sigmoid(k))  (c = 0.5, a lower bound on the decay)
    rwkv6:  -exp(k)                      (decay exp(-exp(k)))
    """

    FORMS = ("gla", "mamba2", "hgrn2", "rwkv6")

    def __init__(self, tau: float = 16.0, form: str = "gla", floor: float = 0.5):
        super().__init__()
        if form not in self.FORMS:
            raise ValueError(f"unknown gate form {form!r}; valid: {', '.join(self.FORMS)}")
        self.tau, self.form, self.floor = tau, form, floor

    def forward(self, h):
        k = h.k0.float()
        if self.form == "gla":
            return F.logsigmoid(k) / self.tau
        if self.form == "mamba2":
            return -F.softplus(k)
        if self.form == "hgrn2":
            return torch.log(self.floor + (1 - self.floor) * torch.sigmoid(k))
        return -torch.exp(k)


class GatedMix(nn.Module):
    """Gated linear attention: S_t = diag(exp g_t) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t."""

    window = 0
    LASP2 = "gated_linear_attention"
    lasp2_group = None  # (group,) once switched by sequence_parallel

    def __init__(self, fq: nn.Module, fk: nn.Module, gate: nn.Module, *, pre_rope: bool = False,
                 scale: float | None = None, backend: str = "auto"):
        super().__init__()
        self.fq, self.fk, self.gate = fq, fk, gate
        self.pre_rope, self.scale, self.backend = pre_rope, scale, backend

    def forward(self, h, state, want_state):
        if self.lasp2_group is not None:
            _whole(state, want_state)
            from linbench.kernels import distributed as D
            q, k = (h.q0, h.k0) if self.pre_rope else (h.q, h.k)
            return D.gated_linear_attention(self.fq(q), self.fk(k), h.v, self.gate(h),
                                            scale=self.scale, backend=self.backend,
                                            group=self.lasp2_group[0])[0], None
        return _stream(self._run, h, state, want_state, self.parameters())

    def _run(self, h, state, want_state):
        q, k = (h.q0, h.k0) if self.pre_rope else (h.q, h.k)
        q, k, g = self.fq(q), self.fk(k), self.gate(h)
        if state is not None and q.shape[1] == 1:
            o, state = K.gated_linear_attention_step(q[:, 0], k[:, 0], h.v[:, 0], g[:, 0], state,
                                                     scale=self.scale)
            return o[:, None], state
        return K.gated_linear_attention(q, k, h.v, g, scale=self.scale, initial_state=state,
                                        output_final_state=want_state, backend=self.backend)

    def state_bytes(self, heads, head_dim, seqlen, elem):
        return heads * head_dim * head_dim * 4


class DeltaMix(nn.Module):
    """DeltaNet (arXiv 2406.06484): S_t = S_{t-1}(I - b_t k_t k_t^T) + b_t v_t k_t^T, with
    q, k through SiLU + L2 norm and a new write strength b_t = sigmoid(W x_t) per head."""

    window = 0

    def __init__(self, fq: nn.Module, fk: nn.Module, hidden: int, heads: int, *,
                 scale: float | None = None, backend: str = "auto"):
        super().__init__()
        self.fq, self.fk, self.scale, self.backend = fq, fk, scale, backend
        self.beta = nn.Linear(hidden, heads, bias=True)
        nn.init.zeros_(self.beta.bias)  # the paper's zero-initialized bias

    def forward(self, h, state, want_state):
        return _stream(self._run, h, state, want_state, self.parameters())

    def _run(self, h, state, want_state):
        q, k = self.fq(h.q), self.fk(h.k)
        beta = torch.sigmoid(self.beta(h.x).float())  # (B, T, H)
        if state is not None and q.shape[1] == 1:
            o, state = K.delta_rule_step(q[:, 0], k[:, 0], h.v[:, 0], beta[:, 0], state, scale=self.scale)
            return o[:, None], state
        return K.delta_rule(q, k, h.v, beta, scale=self.scale, initial_state=state,
                            output_final_state=want_state, backend=self.backend)

    def state_bytes(self, heads, head_dim, seqlen, elem):
        return heads * head_dim * head_dim * 4


class WindowSoftmax(nn.Module):
    """Sliding-window softmax over the last `window` keys (the `swa` baseline, Liger's branch)."""

    def __init__(self, window: int = 64, scale: float | None = None, backend: str = "auto"):
        super().__init__()
        self.window, self.scale, self.backend = window, scale, backend

    def _step(self, h, t, cache):
        o, cache = K.sliding_window_attention_step(h.q[:, t], h.k[:, t], h.v[:, t], cache,
                                                   window=self.window, scale=self.scale)
        return o, cache

    def forward(self, h, state, want_state):
        if state is not None and h.q.shape[1] == 1:  # decoding
            return _steps(self._step, h, state)
        # a prefill, or its next chunk continued from the cached window
        out = K.sliding_window_attention(h.q, h.k, h.v, window=self.window, scale=self.scale,
                                         output_final_state=want_state, initial_state=state,
                                         backend=self.backend)
        return out if want_state else (out, None)

    def state_bytes(self, heads, head_dim, seqlen, elem):
        return 2 * min(seqlen, self.window) * heads * head_dim * elem


class HybridWindow(nn.Module):
    """LoLCATs attention (arXiv 2410.10254, eq. 6): window softmax scaled by
    gamma_h = sigmoid(w_h) plus linear attention on Hedgehog features beyond the window,
    one shared normalizer. w_h starts at -2.1972 (gamma ~ 0.1), the paper's value.

    `affine=True` is the reference code's `affine_attention_factors`: the linear part is
    weighted by 1 - gamma_h. With one shared normalizer only the ratio of the two weights
    matters, so the kernels get gamma_h / (1 - gamma_h) = exp(w_h) as the window weight
    and 1 for the linear part: the same output, and a ratio no longer capped at 1.
    `calibrate()` (the calibrated init) sets w_h from a calibration batch (`accumulate`)."""

    LASP2 = "window_linear_attention"
    lasp2_group = None  # (group,) once switched by sequence_parallel

    def __init__(self, fq: nn.Module, fk: nn.Module, heads: int, window: int = 64,
                 gamma_init: float = -2.1972, scale: float | None = None, backend: str = "auto",
                 affine: bool = False):
        super().__init__()
        self.fq, self.fk, self.window, self.scale, self.backend = fq, fk, window, scale, backend
        self.affine = affine
        self.gamma_logit = nn.Parameter(torch.full((heads,), gamma_init))
        self._logratio: list | None = None  # calibration sums

    def gamma(self) -> torch.Tensor:
        """The window's weight relative to the linear part's (H,), as the kernels take it."""
        return torch.exp(self.gamma_logit) if self.affine else torch.sigmoid(self.gamma_logit)

    def _step(self, h, t, state):
        fq, fk = self.fq(h.q[:, t:t + 1])[:, 0], self.fk(h.k[:, t:t + 1])[:, 0]
        return K.window_linear_attention_step(h.q[:, t], h.k[:, t], h.v[:, t], fq, fk, state,
                                              window=self.window, gamma=self.gamma(),
                                              scale=self.scale)

    def forward(self, h, state, want_state):
        if self.lasp2_group is not None:  # LASP-2H: halo exchange + prefix state
            _whole(state, want_state)
            from linbench.kernels import distributed as D
            return D.window_linear_attention(h.q, h.k, h.v, self.fq(h.q), self.fk(h.k),
                                             window=self.window, gamma=self.gamma(),
                                             scale=self.scale, backend=self.backend,
                                             group=self.lasp2_group[0]), None
        if state is not None and h.q.shape[1] == 1:  # decoding
            return _steps(self._step, h, state)
        # a prefill, or its next chunk continued from the state; the feature maps
        # themselves: the kernel applies them group by group
        out = K.window_linear_attention(h.q, h.k, h.v, self.fq, self.fk, window=self.window,
                                        gamma=self.gamma(), scale=self.scale,
                                        output_final_state=want_state, initial_state=state,
                                        backend=self.backend)
        return out if want_state else (out, None)

    def weights(self, h, i0: int, i1: int):
        """Normalized attention weights of queries i0..i1 over all keys (B, H, n, T), what
        `forward` averages the values with: gamma_h exp(s_ij - m_i) on the window, fq_i.fk_j
        on older keys, one normalizer. `transfer="ce"` distills them (Hedgehog's loss)."""
        a = window_linear_weights(h.q.float(), h.k.float(), self.fq(h.q).float(), self.fk(h.k).float(),
                                  window=self.window, gamma=self.gamma().float(), scale=self.scale,
                                  rows=(i0, i1))
        return a / (a.sum(-1, keepdim=True) + 1e-6)

    @torch.no_grad()
    def accumulate(self, h, block: int = 256):
        """Calibration statistics on one batch (the teacher's q, k of this layer). For each
        query i with older keys, the window weight that gives the hybrid the teacher's
        share of attention inside the window: with M_i the softmax mass of the teacher on
        W(i), E_i = sum_W exp(s_ij - m_i) and L_i = sum_L phi(q_i).phi(k_j),
        gamma/(gamma E_i + L_i) * E_i = M_i  <=>  log gamma = log M_i/(1-M_i) + log L_i/E_i.
        Sums log gamma per head over such queries (query blocks of `block`)."""
        scale = h.q.shape[-1] ** -0.5 if self.scale is None else self.scale
        q, k = h.q.float(), h.k.float()
        fq, fk = self.fq(h.q).float(), self.fk(h.k).float()
        T, W = q.shape[1], self.window
        total = torch.zeros(q.shape[2], dtype=torch.float64, device=q.device)
        count = torch.zeros_like(total)
        j = torch.arange(T, device=q.device)
        for i0 in range(W, T, block):  # queries before W have no older key
            i = torch.arange(i0, min(T, i0 + block), device=q.device)[:, None]
            s = torch.einsum("bihd,bjhd->bhij", q[:, i0:i0 + block] * scale, k)
            d = i - j[None]                                    # query - key distance
            win, old = (d >= 0) & (d < W), d >= W
            lse_all = s.masked_fill(d < 0, float("-inf")).logsumexp(-1)
            sw = s.masked_fill(~win, float("-inf"))
            lse_win, m = sw.logsumexp(-1), sw.amax(-1)
            lin = torch.einsum("bihf,bjhf->bhij", fq[:, i0:i0 + block], fk).mul(old).sum(-1)
            mass = torch.exp(lse_win - lse_all).clamp(1e-6, 1 - 1e-6)
            logg = mass.log() - torch.log1p(-mass) + lin.clamp_min(1e-30).log() - (lse_win - m)
            ok = torch.isfinite(logg) & (lin > 0)
            total += torch.where(ok, logg, 0).double().sum((0, 2))
            count += ok.double().sum((0, 2))
        sums = [total, count]
        self._logratio = sums if self._logratio is None else [a + b for a, b in zip(self._logratio, sums)]

    @torch.no_grad()
    def calibrate(self) -> bool:
        """Set exp(w_h), the affine form's window weight, to the geometric mean of the
        calibrated weights (the paper's form, gamma = sigmoid(w) <= 1, is not calibrated:
        lolcats.calibrates). False when nothing was accumulated."""
        if not self.affine or self._logratio is None or not bool((self._logratio[1] > 0).any()):
            return False
        total, count = self._logratio
        logg = torch.where(count > 0, total / count.clamp_min(1), self.gamma_logit.double())
        self.gamma_logit.copy_(logg.clamp(-12.0, 12.0).to(self.gamma_logit.dtype))
        self._logratio = None
        return True

    def state_bytes(self, heads, head_dim, seqlen, elem):
        f = getattr(self.fk, "feature_dim", head_dim)
        n = min(seqlen, self.window)
        return heads * f * (head_dim + 1) * 4 + n * heads * (2 * head_dim + f) * elem


class MixSum(nn.Module):
    """A weighted sum of mixers, each with its own state (Liger Attention: 0.5 GLA + 0.5 SWA;
    the paper stresses the weights sum to 1)."""

    def __init__(self, parts: list[tuple[float, nn.Module]]):
        super().__init__()
        self.weights_ = [w for w, _ in parts]
        self.parts = nn.ModuleList([m for _, m in parts])
        self.window = max(getattr(m, "window", 0) for m in self.parts)

    def forward(self, h, state, want_state):
        states = tuple(state) if state is not None else (None,) * len(self.parts)
        fields = [getattr(h, f.name) for f in dataclasses.fields(h)]
        T, seg = h.q.shape[1], _segment_len(h.q)
        if T <= seg:
            return self._together(h, states, want_state)
        if not _needs_grad([*fields, *states, *self.parameters()]):
            # A long input without autograd: the parts run segment by segment, each
            # carrying its own state, and only their weighted sum is written out, so no
            # part's whole-sequence output exists (4 GiB each at 2M tokens, fp32, B1 H8 D64).
            kind = type(h)
            out, states = segmented(lambda parts, s: self._together(kind(*parts), s), seg,
                                    states, fields)
            return out, (states if want_state else None)
        outs, new = zip(*(m(h, s, want_state) for m, s in zip(self.parts, states)))
        return (_map(lambda *xs: self._weighted(xs, h.v.dtype), *outs),
                tuple(new) if want_state else None)

    def _weighted(self, xs, dtype):  # in fp32, cast to v's dtype
        return sum(w * x.float() for w, x in zip(self.weights_, xs)).to(dtype)

    def _together(self, h, states, want_state=True):
        """Every part over h from its own state; (weighted sum, the parts' states)."""
        outs, states = zip(*(m(h, s, want_state) for m, s in zip(self.parts, states)))
        return self._weighted(outs, h.v.dtype), (tuple(states) if want_state else None)

    def state_bytes(self, heads, head_dim, seqlen, elem):
        return sum(m.state_bytes(heads, head_dim, seqlen, elem) for m in self.parts)


class GatedDeltaMix(DeltaMix):
    """Gated DeltaNet (arXiv 2412.06464): S_t = a_t S_{t-1}(I - b_t k_t k_t^T) + b_t v_t k_t^T,
    DeltaMix's recurrence with a new data-dependent decay per head, Mamba2's form
    (arXiv 2405.21060): a_t = exp(g_t), g_t = -exp(A_log) softplus(W_a x_t + dt_bias).

    Init (decay near 1, so the layer starts as DeltaMix with a slow forget): W_a = 0,
    A_log = log(a_init), dt_bias = softplus^-1(dt_h) with dt_h log-spaced over the heads
    from dt_min to dt_max, so every head starts at the constant a = exp(-a_init dt_h)
    (0.905..0.999 with the defaults: memories of ~10 to ~1000 tokens)."""

    def __init__(self, fq: nn.Module, fk: nn.Module, hidden: int, heads: int, *,
                 dt_min: float = 1e-3, dt_max: float = 0.1, a_init: float = 1.0,
                 scale: float | None = None, backend: str = "auto"):
        super().__init__(fq, fk, hidden, heads, scale=scale, backend=backend)
        self.decay = nn.Linear(hidden, heads, bias=False)  # W_a
        nn.init.zeros_(self.decay.weight)
        self.A_log = nn.Parameter(torch.full((heads,), float(a_init)).log())
        dt = dt_min * (dt_max / dt_min) ** torch.linspace(0, 1, heads)  # (H,) log-spaced
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus(dt_bias) = dt

    def log_decay(self, x):
        """g = log a (B, T, H) <= 0, in fp32 (or x's dtype when wider)."""
        dt = torch.promote_types(x.dtype, torch.float32)
        pre = self.decay(x).to(dt) + self.dt_bias.to(dt)
        return -torch.exp(self.A_log.to(dt)) * F.softplus(pre)

    def _run(self, h, state, want_state):  # DeltaMix.forward streams long inputs through it
        q, k = self.fq(h.q), self.fk(h.k)
        beta = torch.sigmoid(self.beta(h.x).to(torch.promote_types(h.x.dtype, torch.float32)))
        g = self.log_decay(h.x)  # (B, T, H), like beta
        if state is not None and q.shape[1] == 1:
            o, state = K.delta_rule_step(q[:, 0], k[:, 0], h.v[:, 0], beta[:, 0], state,
                                         g=g[:, 0], scale=self.scale)
            return o[:, None], state
        return K.delta_rule(q, k, h.v, beta, g=g, scale=self.scale, initial_state=state,
                            output_final_state=want_state, backend=self.backend)
