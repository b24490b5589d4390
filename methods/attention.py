"""The linearized attention layer every method is built from.

    x -> q_proj, k_proj, v_proj (pretrained)            # (B, T, H|Hkv, D)
      -> rotary embedding (the model's)                # q, k post-RoPE; q0, k0 pre-RoPE
      -> keys/values repeated to the H query heads     # GQA
      -> mixer (feature maps, kernel, window, gates)   # methods/mixers.py
      -> optional per-head RMSNorm and output gate     # new, identity at init
      -> o_proj (pretrained)

The recurrent state lives in the transformers Cache (`RecurrentCacheLayer`), so
`model.generate` decodes token by token in constant memory per layer.

Attention transfer (stage 1 of recovery): with `transfer` set to "mse" or "ce", the
layer also runs the frozen softmax attention on the same q, k, v (the teacher), stores
the layer's loss in `transfer_loss` and passes the TEACHER output downstream, so every
layer is trained on the original model's hidden states (LoLCATs, arXiv 2410.10254).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import CacheLayerMixin

class RecurrentCacheLayer(CacheLayerMixin):
    """A transformers cache layer holding one mixer state and the tokens seen so far.

    A linearized layer installs it in place of the (still empty) key/value layer of
    whatever Cache it is handed -- the DynamicCache `generate` builds included -- so the
    model's config stays a standard one. It stores no per-token keys.
    """

    def __init__(self, **kwargs):
        super().__init__()
        self.state = None
        self.seen = 0

    def lazy_initialization(self, *args, **kwargs) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state, self.seen = None, 0

    def offload(self):
        pass

    def prefetch(self):
        pass

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state = _map_tensors(self.state, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a recurrent state cannot be cropped back to an earlier position")


def cache_layer(cache, idx: int) -> RecurrentCacheLayer:
    """This layer's RecurrentCacheLayer inside `cache`, installed on first use."""
    while len(cache.layers) <= idx:
        cache.layers.append(RecurrentCacheLayer())
    layer = cache.layers[idx]
    if not isinstance(layer, RecurrentCacheLayer):
        if layer.get_seq_length() > 0:
            raise ValueError(f"cache layer {idx} already holds keys: not a linearized model's cache")
        layer = cache.layers[idx] = RecurrentCacheLayer()
    return layer


def _map_tensors(obj, fn):
    if torch.is_tensor(obj):
        return fn(obj)
    if isinstance(obj, tuple):
        items = [_map_tensors(o, fn) for o in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else tuple(items)
    return obj


@dataclass
class Heads:
    """Inputs of a mixer, all (B, T, H, D) with keys/values repeated to H heads."""
    q: torch.Tensor    # post-RoPE
    k: torch.Tensor
    v: torch.Tensor
    q0: torch.Tensor   # pre-RoPE (Liger's feature map reads these)
    k0: torch.Tensor
    x: torch.Tensor    # the layer input (B, T, C), for data-dependent gates


class HeadRMSNorm(nn.Module):
    """Per-head RMSNorm over D with a learnable (H, D) weight initialized to 1."""

    def __init__(self, heads: int, head_dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(heads, head_dim))
        self.eps = eps

    def forward(self, o):  # (B, T, H, D)
        # F.rms_norm: one fused op (x * rsqrt(mean(x^2) + eps)) instead of five, which is
        # most of this module's cost in a one-token decode step; `norm_reference` is its twin
        of = F.rms_norm(o.float(), (o.shape[-1],), eps=self.eps)
        return (of * self.weight.float()).to(o.dtype)

    def norm_reference(self, o):
        """The unfused form of forward (tests compare the two)."""
        of = o.float()
        of = of * torch.rsqrt(of.pow(2).mean(-1, keepdim=True) + self.eps)
        return (of * self.weight.float()).to(o.dtype)


class OutputGate(nn.Module):
    """o * 2 sigmoid(W x): a new output gate, zero-initialized so it is 1 at the start."""

    def __init__(self, hidden: int, heads: int, head_dim: int):
        super().__init__()
        self.proj = nn.Linear(hidden, heads * head_dim, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.shape = (heads, head_dim)

    def forward(self, o, x):
        g = 2 * torch.sigmoid(self.proj(x)).view(*x.shape[:2], *self.shape)
        return o * g.to(o.dtype)


def rotate(x, cos, sin):
    """RoPE on (B, T, H, D) with cos, sin (B, T, D) from the model's rotary embedding."""
    cos, sin = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def repeat_heads(x, groups: int):  # (B, T, Hkv, D) -> (B, T, Hkv * groups, D)
    return x if groups == 1 else x.repeat_interleave(groups, dim=2)


def rotate_repeat(q0, k0, v, cos, sin, groups: int):
    """(q, k, v, k0) for the mixer: q0 (B, T, H, D) and k0 (B, T, Hkv, D) rotated together
    (one RoPE on their concatenation), then k, v, k0 repeated to H heads together (one
    repeat_interleave). Same values as `rotate` and `repeat_heads` one tensor at a time
    (tests compare them); a quarter of their ops, which matters in a one-token decode step
    where each op costs more than its arithmetic."""
    H, Hkv = q0.shape[2], k0.shape[2]
    q, k = rotate(torch.cat((q0, k0), dim=2), cos, sin).split((H, Hkv), dim=2)
    if groups == 1:
        return q, k, v, k0
    k, v, k0 = torch.stack((k, v, k0)).repeat_interleave(groups, dim=3).unbind(0)
    return q, k, v, k0


def softmax_attention(q, k, v, scale: float):
    """Causal softmax attention on (B, T, H, D): the frozen teacher."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       is_causal=True, scale=scale)
    return o.transpose(1, 2)


class LinearizedAttention(nn.Module):
    """Drop-in replacement for a Llama/Mistral/Qwen2 `self_attn` (same call signature)."""

    def __init__(self, base: nn.Module, mixer: nn.Module, *, norm: bool = False,
                 output_gate: bool = False, hidden_size: int | None = None):
        super().__init__()
        cfg = base.config
        self.config, self.layer_idx = cfg, base.layer_idx
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = base.q_proj, base.k_proj, base.v_proj, base.o_proj
        self.head_dim = base.head_dim
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.mixer = mixer
        self.norm = HeadRMSNorm(self.heads, self.head_dim) if norm else None
        hidden = hidden_size or cfg.hidden_size
        self.gate = OutputGate(hidden, self.heads, self.head_dim) if output_gate else None
        self.transfer: str | None = None        # None | "mse" | "ce" | "calibrate" | "teacher"
        self._moments: list | None = None        # sums for the calibrated init
        self.transfer_loss: torch.Tensor | None = None
        self.transfer_block = 256               # query block of the "ce" loss

    def new_parameters(self):
        """The parameters this method added (what attention transfer trains)."""
        pretrained = {id(p) for m in (self.q_proj, self.k_proj, self.v_proj, self.o_proj)
                      for p in m.parameters()}
        return [p for p in self.parameters() if id(p) not in pretrained]

    def heads_from(self, x, position_embeddings) -> Heads:
        B, T, _ = x.shape
        q0 = self.q_proj(x).view(B, T, self.heads, self.head_dim)
        k0 = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        q, k, v, k0r = rotate_repeat(q0, k0, v, *position_embeddings, self.heads // self.kv_heads)
        return Heads(q, k, v, q0, k0r, x)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        B, T, _ = hidden_states.shape
        h = self.heads_from(hidden_states, position_embeddings)
        layer = cache_layer(cache, self.layer_idx) if cache is not None else None
        if self.transfer is not None:
            o = self._transfer(h)
        else:
            o, state = self.mixer(h, None if layer is None else layer.state, layer is not None)
            if layer is not None:
                layer.state, layer.seen = state, layer.seen + T
            o = self._post(o, h.x)
        return self.o_proj(o.reshape(B, T, -1)), None

    def _post(self, o, x):
        if self.norm is not None:
            o = self.norm(o)
        if self.gate is not None:
            o = self.gate(o, x)
        return o

    def _transfer(self, h: Heads):
        """Compute the student, the teacher and their loss; return the teacher output."""
        with torch.no_grad():
            teacher = softmax_attention(h.q.detach(), h.k.detach(), h.v.detach(), self.scaling)
        if self.transfer == "mse":
            student = self._post(self.mixer(h, None, False)[0], h.x)
            self.transfer_loss = F.mse_loss(student.float(), teacher.float())
        elif self.transfer == "ce":
            self.transfer_loss = self._attention_ce(h)
        elif self.transfer == "calibrate":
            self._accumulate(teacher, h)
        elif self.transfer != "teacher":  # "teacher": the softmax model, nothing else
            raise ValueError(f"unknown transfer loss {self.transfer!r}; valid: mse, ce")
        return teacher

    @torch.no_grad()
    def _accumulate(self, teacher, h: Heads):
        """Calibration statistics: per-(head, channel) second moments of the teacher's
        output and of the student's output after the norm's normalization (before its
        weight), and the mixer's own (`mixer.accumulate`, e.g. HybridWindow's window weight)."""
        if hasattr(self.mixer, "accumulate"):
            self.mixer.accumulate(h)
        if self.norm is None:
            return
        o = self.mixer(h, None, False)[0].float()
        normed = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + self.norm.eps)
        sums = [teacher.float().pow(2).sum((0, 1)), normed.pow(2).sum((0, 1)), o.shape[0] * o.shape[1]]
        self._moments = sums if self._moments is None else [a + b for a, b in zip(self._moments, sums)]

    @torch.no_grad()
    def calibrate(self) -> bool:
        """Calibrated init: the mixer's own (`mixer.calibrate`) first, then the output norm's
        (H, D) weight, so that each head channel's RMS matches the teacher's on the
        calibration tokens seen in "calibrate" mode (w = sqrt(E[teacher^2] / E[normalized
        student^2])). False when nothing was done."""
        done = bool(hasattr(self.mixer, "calibrate") and self.mixer.calibrate())
        if self.norm is None or self._moments is None:
            return done
        t2, s2, n = self._moments
        w = torch.sqrt(t2 / n) / torch.sqrt(s2 / n).clamp_min(1e-6)
        self.norm.weight.copy_(w.to(self.norm.weight.dtype))
        self._moments = None
        return True

    def _attention_ce(self, h: Heads):
        """Hedgehog's attention distillation: cross-entropy between the softmax attention
        weights (soft labels) and the linear attention weights, in query blocks. The
        teacher's entropy is subtracted (so this is KL(p || a), 0 at a perfect match):
        a constant, the gradients are the cross-entropy's.

        Each block is checkpointed: its (B, H, block, T) weights are recomputed in backward
        instead of kept, so a step's graph no longer holds every block of every layer
        (a hedgehog transfer step on SmolLM2-135M at 1 x 1024 tokens: 9.5 -> 1.5 GiB)."""
        T = h.q.shape[1]
        q, k = h.q.detach().transpose(1, 2).float(), h.k.detach().transpose(1, 2).float()  # (B, H, T, D)
        total = 0.0
        for i0 in range(0, T, self.transfer_block):
            i1 = min(T, i0 + self.transfer_block)
            if torch.is_grad_enabled():
                total = total + checkpoint(self._block_kl, q, k, h, i0, i1, use_reentrant=False)
            else:
                total = total + self._block_kl(q, k, h, i0, i1)
        return total / (h.q.shape[0] * self.heads * T)

    def _block_kl(self, q, k, h: Heads, i0: int, i1: int):
        """sum over queries i0..i1 of KL(softmax weights || linear weights)."""
        T = q.shape[2]
        with torch.no_grad():
            s = q[:, :, i0:i1] @ k.transpose(-1, -2) * self.scaling  # (B, H, n, T)
            causal = torch.arange(T, device=s.device)[None] <= torch.arange(i0, i1, device=s.device)[:, None]
            p = s.masked_fill(~causal, float("-inf")).softmax(-1)
            logp = torch.log(p.clamp_min(1e-30))
        a = self.mixer.weights(h, i0, i1)                           # (B, H, n, T), rows sum to 1
        return (p * (logp - torch.log(a.clamp_min(1e-12)))).sum(-1).sum()


def linearized_layers(model) -> list[LinearizedAttention]:
    return [m for m in model.modules() if isinstance(m, LinearizedAttention)]
