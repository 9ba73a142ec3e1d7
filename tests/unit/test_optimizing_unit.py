"""The parts of `dspy-service optimize` that need no provider: the default metric, reading the
trainset, and turning its lines into DSPy examples checked against the program's inputs."""

from __future__ import annotations

from pathlib import Path

import dspy
import orjson
import pytest

from dspy_service.models_config import VariantSpec
from dspy_service.programs import LoadedProgram, load_program
from dspy_service.programs.optimizing import (
    OptimizeFailed,
    build_examples,
    exact_match,
    import_metric,
    read_trainset,
)


def example(**fields: object) -> dspy.Example:
    return dspy.Example(**fields).with_inputs("question")


def test_exact_match_ignores_case_and_runs_of_whitespace_in_text() -> None:
    """The default metric compares text as a reader would: 'Paris.' and '  paris. ' are the same."""
    labelled = example(question="Capital of France?", answer="The capital is  Paris.")
    assert exact_match(labelled, dspy.Prediction(answer="the CAPITAL is\nparis."))
    assert not exact_match(labelled, dspy.Prediction(answer="The capital is Lyon."))


def test_exact_match_needs_every_labelled_field_and_ignores_the_inputs() -> None:
    """Each field of the example that is not an input must be in the prediction, equal; the inputs
    and the prediction's extra fields (its reasoning) are not compared."""
    labelled = example(question="q", topic="geography", answer="Paris")
    assert exact_match(labelled, dspy.Prediction(topic="Geography", answer="paris", reasoning="..."))
    assert not exact_match(labelled, dspy.Prediction(answer="Paris"))  # no topic
    assert not exact_match(labelled, dspy.Prediction(topic="science", answer="Paris"))


def test_exact_match_compares_other_values_by_value() -> None:
    """Numbers, booleans and lists (their text items normalized) are equal when their values are."""
    labelled = example(question="q", count=3, tags=["Blue", "red"], ok=True)
    assert exact_match(labelled, dspy.Prediction(count=3, tags=["blue ", "RED"], ok=True))
    assert not exact_match(labelled, dspy.Prediction(count=4, tags=["blue", "red"], ok=True))
    assert not exact_match(labelled, dspy.Prediction(count=3, tags=["red", "blue"], ok=True))


def write_lines(path: Path, *lines: object) -> Path:
    path.write_text(
        "\n".join(line if isinstance(line, str) else orjson.dumps(line).decode() for line in lines),
        encoding="utf-8",
    )
    return path


def test_trainset_lines_keep_their_numbers_across_blank_lines(tmp_path: Path) -> None:
    """Blank lines are skipped but counted, so an error names the line an editor shows; keys other
    than `example` and `inputs` are ignored."""
    good = {"example": {"question": "q", "answer": "a"}, "inputs": ["question"], "request_id": "r1"}
    path = write_lines(tmp_path / "train.jsonl", good, "", good, "[1, 2]")

    with pytest.raises(OptimizeFailed, match=r"train\.jsonl line 4: expected an object"):
        read_trainset(path)

    records = read_trainset(write_lines(tmp_path / "ok.jsonl", good, "", good))
    assert [record.line for record in records] == [1, 3]
    assert records[0].example == {"question": "q", "answer": "a"}
    assert records[0].inputs == ("question",)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ({"example": {"question": "q"}, "inputs": "question"}, "`inputs` must be a non-empty list"),
        ({"example": {"question": "q"}, "inputs": []}, "`inputs` must be a non-empty list"),
        ({"example": {"question": "q"}, "inputs": [1]}, "`inputs` must be a non-empty list"),
        ({"example": {}, "inputs": ["question"]}, "`example` must be an object"),
        ({"example": "q", "inputs": ["question"]}, "`example` must be an object"),
        ({"example": {"answer": "a"}, "inputs": ["question"]}, "input 'question' is not a field"),
        ('{"example": {', "not valid JSON"),
    ],
)
def test_a_malformed_trainset_line_is_refused(tmp_path: Path, line: object, problem: str) -> None:
    """Each shape a line must have is checked, and the message says which one it lacks."""
    path = write_lines(tmp_path / "train.jsonl", line)
    with pytest.raises(OptimizeFailed, match="line 1: ") as refused:
        read_trainset(path)
    assert problem in str(refused.value)


def test_an_unreadable_or_empty_trainset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OptimizeFailed, match="cannot read the trainset"):
        read_trainset(tmp_path / "missing.jsonl")
    with pytest.raises(OptimizeFailed, match="holds no examples"):
        read_trainset(write_lines(tmp_path / "blank.jsonl", "", "  "))
    (tmp_path / "latin1.jsonl").write_bytes(b'{"example": {"q": "caf\xe9"}}')
    with pytest.raises(OptimizeFailed, match="not UTF-8"):
        read_trainset(tmp_path / "latin1.jsonl")


def signature_program(signature: str) -> LoadedProgram:
    return load_program(VariantSpec(key="qa", signature=signature), "models.yaml")


def test_examples_are_built_with_their_inputs_checked_as_a_request_is(tmp_path: Path) -> None:
    """Each line becomes dspy.Example(**example).with_inputs(*inputs); an input the program does not
    take, or of the wrong type, is refused with the same words a request would get."""
    path = write_lines(
        tmp_path / "train.jsonl",
        {"example": {"question": "q1", "answer": "a1"}, "inputs": ["question"]},
        {"example": {"question": "q2", "answer": "a2"}, "inputs": ["question"]},
    )
    program = signature_program("question -> answer")

    built = build_examples(read_trainset(path), program, path, need_labels=True)

    assert [dict(e.inputs()) for e in built] == [{"question": "q1"}, {"question": "q2"}]
    assert [dict(e.labels()) for e in built] == [{"answer": "a1"}, {"answer": "a2"}]

    typed = signature_program("count: int -> answer")
    wrong = write_lines(
        tmp_path / "wrong.jsonl", {"example": {"count": "3", "answer": "a"}, "inputs": ["count"]}
    )
    with pytest.raises(OptimizeFailed, match=r"wrong\.jsonl line 1: inputs\.count"):
        build_examples(read_trainset(wrong), typed, wrong, need_labels=True)


def test_examples_without_labels_are_refused_only_for_the_default_metric(tmp_path: Path) -> None:
    """Exact match needs an expected output; a custom metric (a judge) may do without one."""
    path = write_lines(tmp_path / "train.jsonl", {"example": {"question": "q"}, "inputs": ["question"]})
    program = signature_program("question -> answer")
    records = read_trainset(path)

    with pytest.raises(OptimizeFailed, match="the default metric has nothing to compare"):
        build_examples(records, program, path, need_labels=True)
    assert len(build_examples(records, program, path, need_labels=False)) == 1


def test_a_metric_path_must_name_a_module_and_a_function() -> None:
    with pytest.raises(OptimizeFailed, match=r"must look like 'package\.module:function'"):
        import_metric("metrics.exact")
    with pytest.raises(OptimizeFailed, match="cannot import 'no_such_package_here'"):
        import_metric("no_such_package_here:metric")
