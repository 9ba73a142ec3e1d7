"""Building a variant's program: a signature run by a built-in module, a user's own dspy.Module
imported from PROGRAMS_PATH (or an installed package), or a whole program saved with
`save(path, save_program=True)`; then its optimized state, its pinned predictors, and a description
of its fields. Every problem is a ConfigError naming the models file, the variant and the problem.
"""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy
import orjson

from dspy_service.errors import ConfigError
from dspy_service.logs import get_logger
from dspy_service.models_config import VariantSpec
from dspy_service.programs.adapter import ADAPTER
from dspy_service.programs.fields import (
    FieldSpec,
    InputSchema,
    forward_fields,
    main_output,
    signature_fields,
)
from dspy_service.programs.fingerprint import program_fingerprint
from dspy_service.programs.tools import program_tools
from dspy_service.timefmt import utc_now_iso

_log = get_logger("dspy_service.programs")


@dataclass(frozen=True, slots=True)
class PredictorInfo:
    name: str  # as named_predictors() reports it: "draft.predict"
    signature: str  # "question -> reasoning, answer"
    demos: int
    model: str | None  # the model it is pinned to, else None (the request's model)
    predictor: Any = field(repr=False, compare=False)  # the dspy.Predict
    # For the worst-case cost a budget holds (predictor.py): how many calls a run makes to it at
    # most as far as the program's structure tells (a ReAct step: max_iters), and the bytes of its
    # prompt that do not depend on the request (instructions, field descriptions, demos, framing).
    max_calls: int = 1
    static_prompt_bytes: int = 0


@dataclass(frozen=True, slots=True)
class LoadedProgram:
    """One variant's program, built once and shared by every request (as DSPy intends)."""

    variant: str
    kind: str  # signature, module, saved
    origin: str  # what it was built from: the signature, the import path, the saved directory
    module: Any  # the dspy.Module
    inputs: InputSchema
    output_specs: tuple[FieldSpec, ...]  # declared; a run returns every field of its Prediction
    main_output: str | None  # None: the first output field of each run that is not working
    fingerprint: str
    is_async: bool  # has `aforward`: runs on the event loop; else in a program thread
    predictors: tuple[PredictorInfo, ...] = ()
    stream_fields: tuple[tuple[str, str], ...] = ()  # (predictor name, text output field)
    tools: tuple[str, ...] = ()
    state_file: str | None = None
    loaded_at: str = ""
    callbacks: tuple[Any, ...] = ()  # DSPy callbacks to run it with (tools.ToolObserver)
    pinned_models: tuple[str, ...] = ()  # the models its pinned predictors call, each once

    @property
    def input_fields(self) -> tuple[str, ...]:
        return self.inputs.names

    @property
    def output_fields(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.output_specs)


def use_program_dirs(dirs: Sequence[Path]) -> None:
    """Put PROGRAMS_PATH in front of the import path, so `module:` paths are found there first."""
    for directory in reversed(dirs):
        text = str(directory)
        if text in sys.path:
            sys.path.remove(text)
        sys.path.insert(0, text)


def forget_program_modules(dirs: Sequence[Path]) -> None:
    """Drop the modules imported from PROGRAMS_PATH, so that a reload imports their new code."""
    roots = [str(d) for d in dirs]
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if path and any(path.startswith(root + "/") for root in roots):
            del sys.modules[name]
    importlib.invalidate_caches()


def _import_module_object(import_path: str, where: str) -> Any:
    module_name, _, attribute = import_path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"{where}.module: cannot import {module_name!r}: {exc} "
            "(looked in PROGRAMS_PATH, then installed packages)"
        ) from None
    except Exception as exc:  # the user's module ran and raised: any exception is theirs to report
        raise ConfigError(
            f"{where}.module: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from None
    found: Any = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise ConfigError(f"{where}.module: {module_name!r} has no attribute {attribute!r}")
        found = getattr(found, part)
    return found


def _build_module(spec: VariantSpec, where: str) -> Any:
    target = _import_module_object(spec.module, where)
    if not callable(target):
        raise ConfigError(f"{where}.module: {spec.module} is neither a dspy.Module subclass nor a factory")
    what = "building" if isinstance(target, type) else "calling the factory"
    try:
        module = target()
    except Exception as exc:  # the user's constructor or factory: whatever it raises
        raise ConfigError(
            f"{where}.module: {what} {spec.module}() raised {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(module, dspy.Module):
        raise ConfigError(
            f"{where}.module: {spec.module}() gave a {type(module).__name__}, not a dspy.Module"
        )
    return module


def _warn_version_mismatch(metadata: Any, variant: str, source: str) -> None:
    """Log each dependency whose version differs from the one the program was saved with."""
    from dspy.utils.saving import get_dependency_versions

    saved = metadata.get("dependency_versions") if isinstance(metadata, dict) else None
    if not isinstance(saved, dict):
        return
    current = get_dependency_versions()
    for name, version in saved.items():
        if current.get(name) != version:
            _log.warning(
                "program.version_mismatch",
                variant=variant,
                file=source,
                dependency=name,
                saved_version=version,
                current_version=current.get(name),
            )


def _load_saved(spec: VariantSpec, where: str) -> Any:
    assert spec.saved is not None
    try:
        metadata = orjson.loads((spec.saved / "metadata.json").read_bytes())
    except (OSError, orjson.JSONDecodeError):
        metadata = None
    _warn_version_mismatch(metadata, spec.key, str(spec.saved))
    try:
        module = dspy.load(str(spec.saved), allow_pickle=spec.trust_pickle)
    except Exception as exc:  # unpickling runs the file's code: anything can come out of it
        raise ConfigError(f"{where}.saved: cannot load {spec.saved}: {type(exc).__name__}: {exc}") from None
    if not isinstance(module, dspy.Module):
        raise ConfigError(f"{where}.saved: {spec.saved} holds a {type(module).__name__}, not a dspy.Module")
    return module


def _build_signature_module(spec: VariantSpec, where: str) -> Any:
    assert spec.signature is not None
    try:
        signature = dspy.Signature(spec.signature, spec.instructions) if spec.instructions else spec.signature
        if spec.module == "chain_of_thought":
            return dspy.ChainOfThought(signature)
        return dspy.Predict(signature)
    except (ValueError, TypeError, SyntaxError) as exc:
        raise ConfigError(f"{where}.signature: {exc}") from None


def _load_state(spec: VariantSpec, module: Any, where: str) -> None:
    assert spec.program is not None
    try:
        metadata = orjson.loads(spec.program.read_bytes()).get("metadata")
    except (OSError, orjson.JSONDecodeError, AttributeError):
        metadata = None
    _warn_version_mismatch(metadata, spec.key, str(spec.program))
    try:
        module.load(str(spec.program))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, orjson.JSONDecodeError) as exc:
        shape = spec.module if spec.kind == "module" else f"{spec.module} of {spec.signature!r}"
        detail = f"missing entry {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ConfigError(
            f"{where}.program: {spec.program} does not fit the module ({shape}): {detail}"
        ) from None


def _pins(spec: VariantSpec, names: list[str], where: str) -> dict[str, str]:
    """Predictor name -> model, from the variant's `models:` (a name or a prefix of names)."""
    pinned: dict[str, str] = {}
    for prefix, model in spec.models.items():
        matched = [n for n in names if n == prefix or n.startswith(prefix + ".")]
        if not matched:
            raise ConfigError(
                f"{where}.models.{prefix}: names no predictor of the program; "
                f"its predictors: {', '.join(names) or '(none)'}"
            )
        for name in matched:
            pinned[name] = model
    return pinned


# What an adapter adds around a predictor's system message and demos (user and assistant turns'
# field markers, the closing format reminder).
_PROMPT_FRAMING_BYTES = 512


def _max_calls(module: Any) -> dict[str, int]:
    """Predictor name -> calls per run where the structure says more than one (ReAct's step)."""
    calls: dict[str, int] = {}
    for name, sub in module.named_sub_modules():
        if isinstance(sub, dspy.ReAct):
            prefix = name.removeprefix("self").lstrip(".")
            calls[f"{prefix}.react" if prefix else "react"] = int(getattr(sub, "max_iters", 1) or 1)
    return calls


def _static_prompt_bytes(predictor: Any) -> int:
    """The system message as the adapter writes it, plus the predictor's state (its demos) as JSON."""
    try:
        system = len(ADAPTER.format_system_message(predictor.signature).encode())
    except (TypeError, ValueError, AttributeError):  # a signature the adapter cannot describe yet
        system = 4096
    return system + len(orjson.dumps(predictor.dump_state(), default=str)) + _PROMPT_FRAMING_BYTES


def _describe_signature(signature: Any) -> str:
    return f"{', '.join(signature.input_fields)} -> {', '.join(signature.output_fields)}"


def _input_specs(module: Any, predictors: list[tuple[str, Any]]) -> tuple[FieldSpec, ...]:
    own = forward_fields(module)
    if own is not None:
        return own
    signature = getattr(module, "signature", None)
    if signature is None and predictors:
        signature = predictors[0][1].signature
    return signature_fields(signature.input_fields) if signature is not None else ()


def _output_specs(module: Any, predictors: list[tuple[str, Any]]) -> tuple[FieldSpec, ...]:
    signature = getattr(module, "signature", None)
    if signature is not None and not isinstance(module, dspy.Predict):
        # ReAct and the like: the declared outputs, plus the working fields their final step adds
        declared = signature_fields(signature.output_fields)
        last = predictors[-1][1].signature.output_fields if predictors else {}
        extra = tuple(s for s in signature_fields(last) if s.name not in signature.output_fields)
        return extra + declared
    return signature_fields(predictors[-1][1].signature.output_fields) if predictors else ()


def build_module(spec: VariantSpec, where: str) -> Any:
    """The variant's dspy.Module, with its state file loaded; ConfigError on any problem."""
    if spec.kind == "saved":
        return _load_saved(spec, where)
    module = _build_module(spec, where) if spec.kind == "module" else _build_signature_module(spec, where)
    if spec.program is not None:
        _load_state(spec, module, where)
    return module


def load_program(spec: VariantSpec, source: str, *, callbacks: tuple[Any, ...] = ()) -> LoadedProgram:
    """Build the variant's program and describe it; ConfigError naming file, variant and problem.

    `callbacks` (a ToolObserver) are kept for programs that hold tools; the others run without.
    """
    where = f"{source}: variants.{spec.key}"
    started = time.perf_counter()
    module = build_module(spec, where)
    predictors = list(module.named_predictors())
    names = [name for name, _ in predictors]
    pins = _pins(spec, names, where)
    outputs = _output_specs(module, predictors)
    output_names = tuple(s.name for s in outputs)
    if spec.output_field is not None and outputs and spec.output_field not in output_names:
        raise ConfigError(
            f"{where}.output_field: {spec.output_field!r} is not an output field of the program; "
            f"its outputs: {', '.join(output_names)}"
        )
    kinds = [type(module), *(type(sub) for _, sub in module.named_sub_modules())]
    code: list[Any] = kinds
    if spec.kind == "module":
        code = [*kinds, _import_module_object(spec.module, where)]
    tools = program_tools(module)
    calls = _max_calls(module)
    program = LoadedProgram(
        variant=spec.key,
        kind=spec.kind,
        origin=(
            str(spec.saved)
            if spec.kind == "saved"
            else spec.module
            if spec.kind == "module"
            else spec.signature or ""
        ),
        module=module,
        inputs=InputSchema(spec.key, _input_specs(module, predictors)),
        output_specs=outputs,
        main_output=main_output(output_names, spec.output_field),
        fingerprint=program_fingerprint(spec, module, code),
        is_async=callable(getattr(module, "aforward", None)),
        predictors=tuple(
            PredictorInfo(
                name=name,
                signature=_describe_signature(predictor.signature),
                demos=len(predictor.demos),
                model=pins.get(name),
                predictor=predictor,
                max_calls=calls.get(name, 1),
                static_prompt_bytes=_static_prompt_bytes(predictor),
            )
            for name, predictor in predictors
        ),
        stream_fields=tuple(
            (name, field_name)
            for name, predictor in predictors
            for field_name, info in predictor.signature.output_fields.items()
            if info.annotation is str
        ),
        tools=tuple(str(tool.name) for tool in tools),
        state_file=str(spec.program) if spec.program is not None else None,
        loaded_at=utc_now_iso(),
        callbacks=callbacks if tools else (),
        pinned_models=tuple(dict.fromkeys(pins.values())),
    )
    _log.info(
        "program.loaded",
        variant=spec.key,
        kind=spec.kind,
        origin=program.origin,
        predictors=len(predictors),
        tools=list(program.tools),
        fingerprint=program.fingerprint,
        secs=round(time.perf_counter() - started, 3),
    )
    return program


def pin_predictors(program: LoadedProgram, lm_of: Any) -> None:
    """Give each pinned predictor its model's LM (`lm_of(model)`): DSPy's Predict calls its own
    `lm` before the one in the request's context, so unpinned predictors use the request's model.

    An LM an unpinned predictor brought along (a state file or saved program recorded the one it was
    optimized with) is dropped, with a warning: which model serves is the models file's to say, and
    that LM carries neither our breakers nor our prices (nor, possibly, any credentials)."""
    for info in program.predictors:
        if info.model is not None:
            info.predictor.lm = lm_of(info.model)
        elif getattr(info.predictor, "lm", None) is not None:
            _log.warning(
                "program.lm_ignored",
                variant=program.variant,
                predictor=info.name,
                lm=str(getattr(info.predictor.lm, "model", "?")),
                detail="the program set an LM on this predictor; it uses the request's model "
                "(pin it with `models:` in the models file to choose one)",
            )
            info.predictor.lm = None
