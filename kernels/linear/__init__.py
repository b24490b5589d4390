"""Causal linear attention: plain, with a fixed per-head decay (Lightning), normalized
(Hedgehog).  S_t = exp(decay) S_{t-1} + k_t v_t^T,  o_t = scale q_t^T S_t.

    reference.py  linear_attention_ref      quadratic torch, obviously correct
    chunked.py    linear_attention_chunked  chunked torch, linear in T; also the chunk
                                            scan gla/ builds on
    recurrent.py  linear_attention_step     one-token decode step
    triton.py     linear_attention          Triton chunked, forward and backward
"""
