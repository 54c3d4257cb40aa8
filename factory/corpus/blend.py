"""The blend plan: how many tokens of each source training will draw, in which phase, and how
many times (epochs) that repeats each source.

Manifest weights are sampling probabilities. A source may instead give `epochs` (the
medical-BERT up-sampling recipe): it then takes epochs x its tokens of the budget and the
weighted sources share the rest. `phases` give each stretch of training its own weights.
The plan is computed by the pretrain stage from the packed token counts (pack/pack.json) and
the training budget, printed, logged, and written to pretrain/blend.json; the training data
(factory.train.data) follows it. It lives there, not in pack, so that a new budget or blend
does not re-tokenise the corpus.

Planned tokens count a training sample as seq_length tokens: GPT samples are packed exactly;
BERT samples hold whole sentences and are padded, so their real draw is a little lower.
"""

from __future__ import annotations

import logging

from pydantic import BaseModel, ConfigDict, Field

from factory.corpus.options import Phase
from factory.stage import UserError

logger = logging.getLogger(__name__)


class BlendSource(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    weight: float = Field(gt=0)
    epochs: float | None = Field(None, gt=0)


class BlendSpec(BaseModel):
    """The manifest's blend (corpus.sources weights/epochs, corpus.phases) as the pretrain
    stage's config sees it."""
    model_config = ConfigDict(extra="forbid", frozen=True)
    sources: list[BlendSource]
    phases: list[Phase] = []
    repeat_warning: float = 4.0

    @classmethod
    def from_corpus(cls, corpus) -> "BlendSpec":
        return cls(sources=[BlendSource(name=s.name, weight=s.weight, epochs=s.epochs)
                            for s in corpus.sources],
                   phases=corpus.phases, repeat_warning=corpus.repeat_warning)

    def plan(self, tokens: dict[str, int], budget_tokens: int) -> dict:
        return plan_blend(tokens, {s.name: s.weight for s in self.sources},
                          {s.name: s.epochs for s in self.sources}, budget_tokens,
                          self.phases, self.repeat_warning)


def plan_blend(tokens: dict[str, int], weights: dict[str, float],
               epochs: dict[str, float | None], budget_tokens: int, phases: list[Phase],
               repeat_warning: float) -> dict:
    """The blend.json content (see the module doc); raises UserError when `epochs` ask for
    more than the budget."""
    names = list(tokens)
    fixed = {n: epochs[n] * tokens[n] / budget_tokens for n in names if epochs.get(n)}
    if phases:
        plan_phases = []
        for i, p in enumerate(phases):
            end = phases[i + 1].start if i + 1 < len(phases) else 1.0
            total = sum(p.weights.get(n, 0.0) for n in names)
            plan_phases.append({"name": p.name, "start": p.start, "end": end,
                                "weights": {n: p.weights.get(n, 0.0) / total for n in names}})
    else:
        fixed_total = sum(fixed.values())
        if fixed_total > 1 + 1e-9:
            want = sum(epochs[n] * tokens[n] for n in fixed)
            raise UserError(f"corpus.sources: the `epochs` given ask for {want:,.0f} tokens, "
                            f"more than the training budget of {budget_tokens:,} "
                            "(training.steps x global_batch_size x seq_length); lower them")
        free = [n for n in names if n not in fixed]
        wsum = sum(weights[n] for n in free)
        if free:
            share = {n: fixed.get(n, 0.0) for n in names}
            for n in free:
                share[n] = (1 - fixed_total) * weights[n] / wsum
        else:
            # every source gives epochs: the budget sets the scale, the epochs the proportions
            share = {n: fixed[n] / fixed_total for n in names}
            if abs(fixed_total - 1) > 0.01:
                logger.warning("blend: the epochs given cover %.0f%% of the training budget; "
                               "the sources are drawn in their proportions", 100 * fixed_total)
        plan_phases = [{"name": "main", "start": 0.0, "end": 1.0, "weights": share}]
    sources, warnings = {}, []
    for n in names:
        share = sum((p["end"] - p["start"]) * p["weights"][n] for p in plan_phases)
        planned = share * budget_tokens
        ep = planned / tokens[n] if tokens[n] else float("inf")
        sources[n] = {"tokens": tokens[n], "share": share, "planned_tokens": round(planned),
                      "epochs": ep}
        if ep > repeat_warning:
            warnings.append(f"source {n!r} would be repeated {ep:.1f} times (more than "
                            f"corpus.repeat_warning={repeat_warning:g}): add data, lower its "
                            "weight, or raise the threshold if intended")
    return {"budget_tokens": budget_tokens, "repeat_warning": repeat_warning,
            "phases": plan_phases, "sources": sources, "warnings": warnings}


def blend_table(plan: dict) -> str:
    """The plan as a plain-text table (logged before training)."""
    lines = [f"blend for {plan['budget_tokens']:,} training tokens:",
             f"  {'source':<20} {'tokens':>14} {'share':>7} {'planned':>14} {'epochs':>7}"]
    for n, s in plan["sources"].items():
        lines.append(f"  {n:<20} {s['tokens']:>14,} {100 * s['share']:>6.1f}% "
                     f"{s['planned_tokens']:>14,} {s['epochs']:>7.2f}")
    if len(plan["phases"]) > 1:
        for p in plan["phases"]:
            ws = ", ".join(f"{n} {100 * w:.0f}%" for n, w in p["weights"].items())
            lines.append(f"  phase {p['name']} [{p['start']:.2f}, {p['end']:.2f}): {ws}")
    return "\n".join(lines)


def log_plan(plan: dict, log) -> None:
    """Prints (logger) and logs (metrics) the plan; warns about heavy repetition."""
    logger.info("%s", blend_table(plan))
    for w in plan["warnings"]:
        logger.warning("blend: %s", w)
    log.metrics({f"{n}.{k}": float(s[k]) for n, s in plan["sources"].items()
                 for k in ("share", "planned_tokens", "epochs")})
