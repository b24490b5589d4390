"""Gated linear attention, per-channel log-gates g (B, T, H, K) (GLA, Liger).
S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,  o_t = scale q_t^T S_t.

    reference.py  gated_linear_attention_ref      quadratic torch, obviously correct
    chunked.py    gated_linear_attention_chunked  linear/'s chunk scan with per-channel gates
    recurrent.py  gated_linear_attention_step     one-token decode step
    triton.py     gated_linear_attention          Triton chunked, forward and backward
"""
