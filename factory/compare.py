"""`factory compare`: does domain pretraining help here? The CaseHOLD paper's question, asked of
the user's own manifest at an equal compute budget.

Four arms, each a normal factory run (cached, resumable) under DIR/<arm>, derived from the one
manifest by overrides so that model size, steps, batch and sequence length stay equal:

- scratch: the domain vocabulary trained from the corpus, a new model with the base's dimensions;
- continued: the base checkpoint with its own vocabulary, pretraining continued;
- continued_extended: the base with its vocabulary extended by domain tokens (new rows
  initialised from their pieces), pretraining continued;
- base: the base checkpoint as it is, evaluated only.

Every arm is scored on the same held-out text of the domain and of general text (the
manifest's corpus.general_text, else English) in units a vocabulary cannot game
(factory.bench.heldout_units), and on the manifest's benchmark tasks.
MLflow: one parent run, one child per arm, the arm's stages below it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

from factory import runner
from factory.manifest import Loaded, load
from factory.stage import StageContext, UserError

log = logging.getLogger(__name__)

ARMS = ("scratch", "continued", "continued_extended", "base")
EXTEND_ADD = 1000   # domain tokens added in the extended arm unless the manifest says otherwise


def _base_dims(base: Path) -> dict[str, int]:
    cfg = json.loads((base / "config.json").read_text(encoding="utf-8"))
    dims = {"num_layers": cfg["num_hidden_layers"], "hidden_size": cfg["hidden_size"],
            "num_attention_heads": cfg["num_attention_heads"],
            "ffn_hidden_size": cfg["intermediate_size"]}
    kv = cfg.get("num_key_value_heads")
    if kv and kv != cfg["num_attention_heads"]:
        dims["num_query_groups"] = kv
    return dims


def _flow(d: dict) -> str:
    return json.dumps(d)   # JSON is YAML: `--set key={...}` takes it as a mapping


def arm_overrides(manifest: Path, scale: str | None, loaded: Loaded, base: Path,
                  arm: str) -> list[str]:
    """The `--set` overrides that turn the manifest into one arm."""
    m = loaded.manifest
    base_spec = m.base.path
    continued = ["strategy=continued", f"base={_flow({'path': base_spec})}", "tokenizer=null",
                 "model.size=null"]
    if arm in ("continued", "base"):
        return continued
    if arm == "continued_extended":
        add = EXTEND_ADD
        if m.tokenizer is not None and getattr(m.tokenizer, "extend", None) is not None:
            add = m.tokenizer.extend.add
        return [*continued[:2], f"tokenizer={_flow({'extend': {'add': add}})}", "model.size=null"]
    # scratch: the domain vocabulary the manifest trains at full scale, at this scale's data.
    spec = m.tokenizer or load(manifest, scale=None).manifest.tokenizer
    if spec is None:
        raise UserError(f"{manifest}: tokenizer: the scratch arm needs a tokenizer spec "
                        "(kind, vocab_size, casing) at full scale or at this scale")
    tok = spec.model_dump(mode="json", exclude_none=True)
    tok.pop("extend", None)
    model = {"size": None, **_base_dims(base)}
    return ["strategy=scratch", "base=null", f"tokenizer={_flow(tok)}", f"model={_flow(model)}"]


class _Nested:
    """A tracker whose 'parent' runs are children of the compare run (one per arm)."""

    def __init__(self, tracker, parent):
        self._tracker, self._parent = tracker, parent

    def start_parent(self, name: str, tags: dict[str, str]):
        return self._tracker.start_child(self._parent, name, tags)

    def __getattr__(self, name: str):
        return getattr(self._tracker, name)


def has_lm_head(folder: Path) -> bool:
    """Whether an HF folder carries trained LM-head weights (a sentence encoder does not)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    keys: set[str] = set()
    for f in files:
        with safe_open(str(f), "pt") as st:
            keys |= set(st.keys())
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if cfg.get("model_type") == "bert":
        return any(k.startswith("cls.predictions") for k in keys)
    return any(k.startswith("lm_head") for k in keys) or bool(cfg.get("tie_word_embeddings"))


def compare(manifest: Path, run_dir: Path, *, scale: str | None = None,
            overrides: list[str] = (), arms: tuple[str, ...] = ARMS,
            general: Path | None = None, progress: Callable | None = None) -> dict:
    """Run the arms and write DIR/compare.json + the report; returns compare.json's content."""
    from factory import base_checkpoint, tracking
    from factory.bench.heldout import read_documents

    loaded = load(manifest, scale=scale, overrides=list(overrides))
    m = loaded.manifest
    if m.base is None:
        raise UserError(f"{manifest}: base.path: compare needs a base checkpoint at scale "
                        f"{scale or 'full'} (the continued arms start from it)")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise UserError(f"--arms {','.join(unknown)}: unknown (arms: {', '.join(ARMS)})")
    base = base_checkpoint.resolve(m.base.path, loaded.root)
    run_dir = run_dir.resolve()
    arm_loaded = {a: load(manifest, scale=scale,
                          overrides=[*overrides, *arm_overrides(manifest, scale, loaded, base, a)])
                  for a in arms}
    for a, ld in arm_loaded.items():   # every check of every arm before any work
        planned = runner.plan(ld)
        runner.check(planned, runner.select(planned, None, "pack" if a == "base" else None))
    if general is None and m.corpus.general_text is not None:
        general = loaded.resolve(m.corpus.general_text)
    general, general_texts = _general_texts(general, m.evaluation.heldout_max_docs)

    tracker = tracking.Tracker(m.name)
    parent = tracker.start_parent(f"{m.name}-{scale or 'full'}-compare", tags={
        "factory.run_dir": str(run_dir), "factory.compare": "true",
        "factory.scale": scale or "full"})
    result: dict[str, Any] = {"manifest": str(manifest), "scale": scale,
                              "general_text": str(general) if general else None, "arms": {}}
    status = "FAILED"
    try:
        for a in arms:
            log.info("compare: arm %s", a)
            arm_dir = run_dir / a
            summary = runner.run(arm_loaded[a], arm_dir, until="pack" if a == "base" else None,
                                 tracker_factory=lambda _e: _Nested(tracker, parent),
                                 progress=progress)
            if a == "base":
                _evaluate_base(arm_loaded[a], arm_dir, base)
            domain_texts = read_documents(sorted((arm_dir / "corpus" / "heldout").glob("*.jsonl.gz")),
                                          m.evaluation.heldout_max_docs)
            result["arms"][a] = _score(arm_loaded[a], arm_dir, a, domain_texts, general_texts,
                                       summary)
            parent.metrics({f"{a}.{k}": v for k, v in _numbers(result["arms"][a]).items()})
            parent.flush()
            _write(run_dir, result)
        status = "FINISHED"
    finally:
        parent.end(status)
    from factory.report import compare_report

    for path in compare_report(result, run_dir):
        parent.artifact(path)
    result["report"] = str(run_dir / "compare.md")
    _write(run_dir, result)
    return result


def _general_texts(general: Path | None,
                   max_docs: int | None) -> tuple[Path | None, list[str]]:
    """The general held-out file used and its documents."""
    from factory.bench.heldout import read_documents

    candidates = [general] if general is not None else [
        Path(__file__).resolve().parents[1] / "domains" / "general" / "heldout.jsonl.gz",
        Path(__file__).resolve().parents[2] / "shared" / "corpora" / "general" / "heldout.jsonl.gz"]
    for c in candidates:
        if c is not None and c.is_file():
            return c, read_documents([c], max_docs)
    if general is not None:
        raise UserError(f"--general {general}: no such file (JSON Lines with a text field)")
    log.warning("no general held-out text found (domains/general/heldout.jsonl.gz); "
                "forgetting is not measured")
    return None, []


def _evaluate_base(loaded: Loaded, arm_dir: Path, base: Path) -> None:
    """The evaluate stage on the base checkpoint itself, as if it were the export."""
    from factory.evaluate import EvaluateStage

    export = arm_dir / "export"
    if export.exists():
        shutil.rmtree(export)
    shutil.copytree(base, export / "hf")
    shutil.copytree(arm_dir / "vocab" / "tokenizer", export / "hf", dirs_exist_ok=True)
    stage = EvaluateStage.from_manifest(loaded)
    if not has_lm_head(export / "hf"):   # a new, random head would score noise
        stage = EvaluateStage(stage.config.model_copy(update={"heldout_loss": False}))
    out = arm_dir / "evaluate"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    stage.run(StageContext(out=out, inputs={"export": export, "corpus": arm_dir / "corpus",
                                            "pack": arm_dir / "pack"}))


def _score(loaded: Loaded, arm_dir: Path, arm: str, domain: list[str], general: list[str],
           summary: dict) -> dict:
    from factory.bench.heldout_units import heldout_per_unit

    m = loaded.manifest
    hf = arm_dir / "export" / "hf"
    t = m.training
    steps = 0 if arm == "base" else t.total_steps
    entry: dict[str, Any] = {"steps": steps, "tokens": steps * t.global_batch_size * t.seq_length,
                             "benchmarks": {}, "domain_heldout_loss": None,
                             "general_heldout_loss": None, "heldout_unit": None}
    results = json.loads((arm_dir / "evaluate" / "results.json").read_text(encoding="utf-8"))
    for name, r in results.get("tasks", {}).items():
        value = r.get("mean", r.get("f1"))
        if value is not None:
            entry["benchmarks"][name] = float(value)
    if has_lm_head(hf):
        for key, texts in (("domain_heldout_loss", domain), ("general_heldout_loss", general)):
            if texts:
                r = heldout_per_unit(hf, texts, m.family, t.seq_length)
                entry[key], entry["heldout_unit"] = r["loss"], r["unit"]
    else:
        entry["note"] = "the base checkpoint has no trained LM head: held-out loss not defined"
    curve = arm_dir / "pretrain" / "metrics.jsonl"
    if curve.is_file():
        entry["loss_curve"] = [[r["step"], r["loss"]] for r in map(json.loads, curve.open())]
    fert = arm_dir / "vocab" / "fertility.json"
    if fert.is_file():
        entry["fertility"] = json.loads(fert.read_text(encoding="utf-8"))
    entry["run_dir"] = str(arm_dir)
    return entry


def _numbers(entry: dict) -> dict[str, float]:
    out = {f"bench.{k}": v for k, v in entry["benchmarks"].items()}
    for k in ("domain_heldout_loss", "general_heldout_loss"):
        if entry[k] is not None:
            out[k] = entry[k]
    return out


def _write(run_dir: Path, result: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    runner._write_atomic(run_dir / "compare.json", json.dumps(result, indent=2))
