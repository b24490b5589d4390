"""Sliding-window softmax attention (SWA, Liger) and the LoLCATs window + linear hybrid.

    reference.py  sliding_window_attention_ref, window_linear_attention_ref
                  quadratic torch, obviously correct
    chunked.py    sliding_window_attention_chunked, window_linear_attention_chunked
                  blockwise torch over the key band, O(T * (block + window))
    recurrent.py  WindowCache, WindowState, window_cache, window_state (decode states,
                  also after a prefill) and the *_step one-token decode steps
    triton.py     sliding_window_attention, window_linear_attention
                  FlashAttention-style Triton band kernel, forward and backward
"""
