import torch

from linbench.methods.softmax import Softmax
from tests.conftest import make_tiny_llama


def test_softmax_is_the_unmodified_model_and_counts_its_kv_cache():
    model = make_tiny_llama()
    assert Softmax().linearize(model) is model
    T = 37
    with torch.no_grad():
        cache = model(torch.arange(T)[None], use_cache=True).past_key_values
    actual = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert Softmax().state_bytes(model, T) == actual
