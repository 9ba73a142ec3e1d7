"""Optimizing a served variant's program with DSPy's few-shot optimizers (`dspy-service optimize`).

The program is the one the service builds (`load_program`), run with the models file's LMs (the
request's model for unpinned predictors, each pinned predictor's own) through the service's adapter.
`labeled-fewshot` puts training examples in as demos; `bootstrap-fewshot` runs the program on each
example and keeps the runs the metric passes as demos of every predictor they went through, then
fills the remaining slots with training examples. The result is the program's state, as
`module.save("x.json")` writes it, which a variant loads with `program: x.json`.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspy
import orjson

from dspy_service.errors import InvalidRequest
from dspy_service.models_config import IMPORT_PATH_PATTERN
from dspy_service.programs.adapter import ADAPTER
from dspy_service.programs.failures import UsageByModel, usage_totals
from dspy_service.programs.loading import LoadedProgram

OPTIMIZERS = ("labeled-fewshot", "bootstrap-fewshot")

Metric = Callable[..., Any]  # DSPy's metric: (example, prediction, trace=None) -> bool or number


class OptimizeFailed(Exception):
    """A problem the user can fix (the trainset, the metric, the program, the run), in one line."""


@dataclass(frozen=True, slots=True)
class TrainRecord:
    """One trainset line: its field values and which of them are inputs."""

    line: int
    example: dict[str, Any]
    inputs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PredictorDemos:
    name: str
    demos: int
    bootstrapped: int  # demos from the program's own runs that passed the metric; the rest are labelled


@dataclass(frozen=True, slots=True)
class Score:
    mean: float  # the metric's mean over the trainset (a failed run scores 0)
    failed_runs: int


@dataclass(frozen=True, slots=True)
class Optimized:
    module: Any  # the optimized dspy.Module, with no LM of its own on any predictor
    predictors: tuple[PredictorDemos, ...]
    failed_runs: int  # runs the optimizer saw fail (bootstrap-fewshot)
    usage_by_model: UsageByModel  # every provider call of the command: scoring and optimizing
    score_before: Score | None = None
    score_after: Score | None = None


# -- the trainset --------------------------------------------------------------------------------


def read_trainset(path: Path) -> list[TrainRecord]:
    """The JSONL lines `{"example": {...}, "inputs": [...], ...}` (other keys ignored)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise OptimizeFailed(f"cannot read the trainset {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise OptimizeFailed(f"the trainset {path} is not UTF-8 text: {exc.reason}") from None
    records = [
        _record(number, line, path) for number, line in enumerate(text.splitlines(), 1) if line.strip()
    ]
    if not records:
        raise OptimizeFailed(f"the trainset {path} holds no examples")
    return records


def _record(number: int, line: str, path: Path) -> TrainRecord:
    where = f"{path} line {number}"
    try:
        raw = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise OptimizeFailed(f"{where}: not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise OptimizeFailed(f"{where}: expected an object with `example` and `inputs`")
    example = raw.get("example")
    if not isinstance(example, dict) or not example:
        raise OptimizeFailed(f"{where}: `example` must be an object of field values")
    inputs = raw.get("inputs")
    if not isinstance(inputs, list) or not inputs or not all(isinstance(name, str) for name in inputs):
        raise OptimizeFailed(f"{where}: `inputs` must be a non-empty list of field names")
    missing = [name for name in inputs if name not in example]
    if missing:
        raise OptimizeFailed(f"{where}: input {missing[0]!r} is not a field of its example")
    return TrainRecord(line=number, example=example, inputs=tuple(inputs))


def build_examples(
    records: list[TrainRecord], program: LoadedProgram, path: Path, *, need_labels: bool
) -> list[Any]:
    """`dspy.Example(**example).with_inputs(*inputs)` for each record, its inputs checked as the
    service checks a request's (so the program sees the values a request would give it: pydantic
    models built, numbers of their declared types). `need_labels`: each must have a non-input field."""
    examples = []
    for record in records:
        where = f"{path} line {record.line}"
        given = {name: record.example[name] for name in record.inputs}
        try:
            values, _ = program.inputs.validate(given)
        except InvalidRequest as exc:
            raise OptimizeFailed(f"{where}: {exc.message}") from None
        if need_labels and len(record.example) == len(record.inputs):
            raise OptimizeFailed(
                f"{where}: every field of the example is an input, so the default metric has nothing "
                "to compare; add the expected outputs or give --metric"
            )
        examples.append(dspy.Example(**{**record.example, **values}).with_inputs(*record.inputs))
    return examples


# -- metrics -------------------------------------------------------------------------------------


def _normalized(value: Any) -> Any:
    if isinstance(value, str):
        return " ".join(value.split()).casefold()
    if isinstance(value, (list, tuple)):
        return [_normalized(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _normalized(item) for key, item in value.items()}
    dump = getattr(value, "model_dump", None)
    if callable(dump):
        return _normalized(dump(mode="json"))
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return _normalized(str(value))


def exact_match(example: Any, prediction: Any, trace: Any = None) -> bool:
    """The default metric: every field of the example that is not an input equals the prediction's
    field of that name (text compared without regard to case or runs of whitespace)."""
    for name, expected in example.labels().items():
        if name not in prediction or _normalized(prediction[name]) != _normalized(expected):
            return False
    return True


def import_metric(import_path: str) -> Metric:
    """`package.module:function`, found in PROGRAMS_PATH first (as programs are), then installed."""
    if not re.match(IMPORT_PATH_PATTERN, import_path):
        raise OptimizeFailed(f"--metric {import_path!r} must look like 'package.module:function'")
    module_name, _, attribute = import_path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise OptimizeFailed(
            f"--metric: cannot import {module_name!r}: {exc} "
            "(looked in PROGRAMS_PATH, then installed packages)"
        ) from None
    except Exception as exc:  # the user's module ran and raised: whatever it raises is theirs to see
        raise OptimizeFailed(
            f"--metric: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from None
    found: Any = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise OptimizeFailed(f"--metric: {module_name!r} has no attribute {attribute!r}")
        found = getattr(found, part)
    if not callable(found):
        raise OptimizeFailed(f"--metric: {import_path} is not a function but a {type(found).__name__!r}")
    metric: Metric = found
    return metric


def _as_score(value: Any) -> float:
    if isinstance(value, (bool, int, float)):
        return float(value)
    inner = getattr(value, "score", None)  # a dspy.Prediction(score=..., feedback=...), as GEPA's
    if isinstance(inner, (bool, int, float)):
        return float(inner)
    raise OptimizeFailed(
        f"the metric returned a {type(value).__name__} ({value!r:.40}), not a bool or a number"
    )


def _score(module: Any, trainset: list[Any], metric: Metric) -> Score:
    """The metric's mean over the trainset; a run that fails scores 0 (all failing: OptimizeFailed)."""
    total = 0.0
    failures: list[str] = []
    for example in trainset:
        try:
            prediction = module(**example.inputs())
        except Exception as exc:  # the provider's or the program's own failure: this run scores 0
            failures.append(f"{type(exc).__name__}: {exc}")
            continue
        try:
            value = metric(example, prediction)
        except Exception as exc:  # the user's metric: whatever it raises is theirs to see
            raise OptimizeFailed(f"the metric raised {type(exc).__name__}: {exc}") from None
        total += _as_score(value)
    if len(failures) == len(trainset):
        raise OptimizeFailed(f"every run of the program failed; the first: {failures[0]}")
    return Score(mean=total / len(trainset), failed_runs=len(failures))


# -- optimizing ----------------------------------------------------------------------------------


def _set_lms(module: Any, lms: dict[str, Any]) -> Any:
    """Give each predictor the LM named for it in `lms` (its pin) and take every other one's away."""
    for name, predictor in module.named_predictors():
        predictor.lm = lms.get(name)
    return module


class _PinnedBootstrap(dspy.BootstrapFewShot):  # type: ignore[misc]  # dspy is Any to mypy
    """BootstrapFewShot whose teacher (the program that runs) keeps the models file's pins.

    DSPy builds the teacher from the student with `reset_copy()`, which takes every predictor's own
    LM away: the pinned predictors would run on the request's model. The pins are given back once
    the teacher is built; `pinned` says that happened (a DSPy upgrade that renames the step is an
    error, not a silent run on the wrong models)."""

    def __init__(self, pins: dict[str, Any], **options: Any) -> None:
        super().__init__(**options)
        self._pins = pins
        self.pinned = False

    def _prepare_student_and_teacher(self, student: Any, teacher: Any) -> None:
        super()._prepare_student_and_teacher(student, teacher)
        _set_lms(self.teacher, self._pins)
        self.pinned = True


def _compile(
    optimizer: str, module: Any, trainset: list[Any], metric: Metric, max_demos: int, pins: dict[str, Any]
) -> tuple[Any, int]:
    """The optimized module and how many runs failed on the way."""
    if optimizer == "labeled-fewshot":
        return dspy.LabeledFewShot(k=max_demos).compile(module, trainset=trainset), 0
    bootstrap = _PinnedBootstrap(
        pins, metric=metric, max_bootstrapped_demos=max_demos, max_labeled_demos=max_demos
    )
    compiled = bootstrap.compile(module, trainset=trainset)
    if pins and not bootstrap.pinned:
        raise OptimizeFailed(
            f"DSPy {dspy.__version__}'s BootstrapFewShot no longer builds its teacher where expected: "
            "the pinned predictors' models could not be kept"
        )
    failed = int(bootstrap.error_count)
    if failed >= len(trainset):
        raise OptimizeFailed(
            f"bootstrap-fewshot: all {failed} runs of the program failed (DSPy logged each above)"
        )
    return compiled, failed


def _demos_of(module: Any) -> tuple[PredictorDemos, ...]:
    return tuple(
        PredictorDemos(
            name=name,
            demos=len(predictor.demos),
            bootstrapped=sum(1 for demo in predictor.demos if demo.get("augmented")),
        )
        for name, predictor in module.named_predictors()
    )


def optimize(
    program: LoadedProgram,
    *,
    lm: Any,
    lm_of: Callable[[str], Any],
    trainset: list[Any],
    optimizer: str,
    metric: Metric,
    max_demos: int,
    score: bool = True,
) -> Optimized:
    """Run `optimizer` on the variant's program; `lm` serves the unpinned predictors, `lm_of(model)`
    the pinned ones. With `score`, the metric is measured on the trainset with the program as served
    and as optimized (one run per example each)."""
    module = program.module
    if not callable(getattr(type(module), "forward", None)):  # on the instance, DSPy warns of a direct call
        raise OptimizeFailed(
            f"variant {program.variant!r}: its program defines only `aforward`; DSPy's optimizers run "
            "programs through `forward`"
        )
    pins = {info.name: lm_of(info.model) for info in program.predictors if info.model is not None}
    # The LMs are taken off the predictors while DSPy copies the program (it would copy their
    # clients, with a warning each) and given back to the copies that run.
    _set_lms(module, {})
    try:
        with dspy.context(lm=lm, adapter=ADAPTER, track_usage=True), dspy.track_usage() as tracker:
            before = _score(_set_lms(module.deepcopy(), pins), trainset, metric) if score else None
            try:
                compiled, failed_runs = _compile(optimizer, module, trainset, metric, max_demos, pins)
            except OptimizeFailed:
                raise
            except Exception as exc:  # DSPy re-raises the run's or the metric's error past max_errors
                raise OptimizeFailed(f"{optimizer} failed: {type(exc).__name__}: {exc}") from None
            _set_lms(compiled, {})  # no LM in the state file: which model serves is the models file's
            after = _score(_set_lms(compiled.deepcopy(), pins), trainset, metric) if score else None
    finally:
        _set_lms(module, pins)
    return Optimized(
        module=compiled,
        predictors=_demos_of(compiled),
        failed_runs=failed_runs,
        usage_by_model=usage_totals(tracker),
        score_before=before,
        score_after=after,
    )


def save_state(module: Any, out: Path) -> None:
    """`module.save(out)`, through a temporary file beside it: a failed write leaves no half file."""
    temporary = out.with_name(f".{out.stem}.{os.getpid()}.tmp.json")
    try:
        module.save(str(temporary))
        os.replace(temporary, out)
    except (OSError, RuntimeError) as exc:  # DSPy wraps a failed write in RuntimeError
        raise OptimizeFailed(f"cannot write {out}: {exc}") from None
    finally:
        temporary.unlink(missing_ok=True)
