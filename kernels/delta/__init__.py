"""The (gated) delta rule (DeltaNet, Gated DeltaNet).
S_t = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T,  a_t = exp(g_t),  o_t = scale q_t^T S_t.

    reference.py  delta_rule_ref      token-by-token torch, obviously correct
    chunked.py    delta_rule_chunked  chunked WY form in torch, linear in T
    recurrent.py  delta_rule_step     one-token decode step
    triton.py     delta_rule          WY form: torch per-chunk pieces, Triton state sweep
"""
