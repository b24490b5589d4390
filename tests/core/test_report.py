from linbench.report import tables


def _rec(method, acc, dtype="float32", model_hash="a" * 64):
    return {"method": method, "suite": "mmlu5", "suite_version": "1", "status": "ok",
            "versions": {"lm_eval": "0.4.13"}, "dtype": dtype,
            "model": {"name": "m", "file_hash": model_hash},
            "metrics": {"acc": {"value": acc, "stderr": 0.01, "n": 100}}}


def test_rows_share_a_table_only_under_one_comparability_key():
    out = tables([_rec("softmax", 0.5), _rec("lolcats", 0.4), _rec("softmax", 0.3, "bfloat16"),
                  _rec("softmax", 0.6, model_hash="b" * 64)])
    assert len(out) == 3
    first = out[0]
    assert "| lolcats | ok | 100 | 40.0 ±1.0 | 80.0% |" in first
    assert "| softmax | ok | 100 | 50.0 ±1.0 | 100.0% |" in first
    assert "bfloat16" in out[1] and "30.0" in out[1] and "40.0" not in out[1]
