"""pytest-benchmark entries for prefix reuse (suites/prefix.py) against lm-eval's plain
HFLM path, on three 5-shot MMLU questions of one subject x 4 choices, a tiny random
Llama with the real tokenizer (timings only with --benchmark-enable):

    python -m pytest tests/benchmarks/test_prefix_speed.py --benchmark-enable

Under the default --benchmark-disable each body runs once, as a smoke test; that the two
paths give the same scores is tests/suites/test_prefix_reuse.py.
"""
from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance

from linbench.suites.prefix import PrefixReuseLM
from tests.conftest import make_tiny_llama
from tests.suites.test_mmlu5 import hand_prompt


@pytest.mark.parametrize("reuse", [False, True], ids=["hflm", "prefix_reuse"])
def test_mmlu_loglikelihood(benchmark, reuse, smol_tokenizer):
    reqs = [Instance("loglikelihood", {}, (hand_prompt("anatomy", row), " " + letter), i)
            for i, (row, letter) in enumerate((r, c) for r in range(3) for c in "ABCD")]
    lm = PrefixReuseLM(pretrained=make_tiny_llama(num_hidden_layers=4), tokenizer=smol_tokenizer,
                       batch_size=1, progress=False, prefix_reuse=reuse)
    out = benchmark(lm.loglikelihood, reqs)
    assert len(out) == 12
    assert lm.stats["shared_groups"] == (1 if reuse else 0)
