"""One metric of record B against record A with the report's own paired test (document
bootstrap for perplexities, McNemar or paired bootstrap for accuracies): how the study
rows in methods/README.md are compared with the leaderboard's rows.

    python results/embedded/scripts/compare.py A.json B.json [metric ...]   (default ppl_wiki)
"""
import json
import sys

from linbench.report.stats import compare


def main(a_path, b_path, *metrics):
    a, b = (json.load(open(p)) for p in (a_path, b_path))
    for metric in metrics or ("ppl_wiki",):
        c = compare(a, b, metric)
        values = [r["metrics"][metric]["value"] for r in (a, b)]
        ci = "" if c.ci is None else f" [{c.ci[0]:.3f}, {c.ci[1]:.3f}]"
        print(f"{metric}: A {values[0]:.4g}, B {values[1]:.4g}; B vs A "
              f"{'ratio' if c.ratio else 'diff'} {c.diff:.3f}{ci}, {c.test}, n {c.n_shared}, "
              f"significant: {c.significant}")


if __name__ == "__main__":
    main(*sys.argv[1:])
