"""Sliding-window softmax attention (SWA, Liger) and the LoLCATs window + linear hybrid.

    reference.py  sliding_window_attention_ref, window_linear_attention_ref
                  quadratic torch, obviously correct
    chunked.py    sliding_window_attention_chunked, window_linear_attention_chunked
                  blockwise torch over the key band, streamed: peak memory inputs +
                  output + one group of (block x (block + window)) scores, any T
    recurrent.py  WindowCache, WindowState, window_cache, window_state (decode states,
                  also after a prefill) and the *_step one-token decode steps
    triton.py     sliding_window_attention, window_linear_attention
                  FlashAttention-style Triton band kernel, forward and backward; the
                  hybrid streamed group by group around it
    stream.py     streamed: the group-by-group driver both forms share (an
                  autograd.Function whose backward recomputes one group at a time)

Streaming (long context): no form but the reference holds a tensor of the whole sequence
other than the inputs, the output, (backward) the gradients, and the Triton window
kernel's per-row statistics (B, H, T); the reference stays quadratic, the slow
obviously-correct twin the tests compare with.
"""
