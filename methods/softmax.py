"""`softmax`: the unmodified pretrained model, the parent row of every table."""
from __future__ import annotations

from torch import nn

from linbench.methods.base import Method


class SDPAMixer(nn.Module):
    """Causal softmax attention on (B, T, H, D) through torch SDPA (FlashAttention on GPU)."""

    flops_kind = "softmax"

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim

    def forward(self, q, k, v):
        from linbench.methods.attention import softmax_attention
        return softmax_attention(q, k, v, q.shape[-1] ** -0.5)

    def state_bytes(self, batch: int, seqlen: int, elem: int = 4) -> int:
        """This layer's KV cache: keys and values of every token."""
        return 2 * batch * seqlen * self.heads * self.head_dim * elem


class Softmax(Method):
    name = "softmax"
    role = "parent"

    def linearize(self, model):
        return model

    def state_bytes(self, model, seqlen: int) -> int:
        """KV cache: 2 (k and v) x layers x kv heads x head dim x seqlen x element size."""
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        elem = next(model.parameters()).element_size()
        return 2 * c.num_hidden_layers * kv_heads * head_dim * seqlen * elem

    def mixer(self, heads: int, head_dim: int, backend: str = "auto"):
        return SDPAMixer(heads, head_dim)
