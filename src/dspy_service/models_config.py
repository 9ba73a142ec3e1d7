"""The models/variants file: parsed, validated and turned into frozen objects.

Any problem stops start-up with a message naming the file, the entry and the problem.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dspy_service.errors import ConfigError
from dspy_service.experiments import normalize_weights
from dspy_service.feedback_metrics import FeedbackMetrics


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DEFAULT_MAX_OUTPUT_TOKENS = 4096


class ModelSpec(_Strict):
    """One model a client may ask for, by its public name (the key in `models:`)."""

    key: str = ""
    name: str = Field(min_length=1, description="provider model id, e.g. openai/gpt-3.5-turbo")
    cost_per_1k_input_tokens: float | None = Field(default=None, ge=0)
    cost_per_1k_output_tokens: float | None = Field(default=None, ge=0)
    max_retries: int = Field(default=2, ge=0, le=10)
    request_timeout_secs: float = Field(default=30, gt=0, le=600)
    api_base: str | None = None
    api_key_env: str | None = None
    fallbacks: tuple[str, ...] = ()
    # Cache answers to sampled requests (temperature above 0 and no seed)? Such a request asks for
    # a fresh draw, so a cached one answers it with what another caller drew. Yes by default (as
    # before: most callers sample only to vary style); false gives every such request its own call.
    cache_sampled: bool = True
    # The completion limit: sent to the provider as max_tokens when a request gives none, and the cap
    # on a request's own max_tokens. Unset: nothing is sent, and budgets assume
    # DEFAULT_MAX_OUTPUT_TOKENS when they hold a call's worst-case cost.
    max_output_tokens: int | None = Field(default=None, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _prices_come_in_pairs(self) -> ModelSpec:
        if (self.cost_per_1k_input_tokens is None) != (self.cost_per_1k_output_tokens is None):
            raise ValueError("give both cost_per_1k_input_tokens and cost_per_1k_output_tokens, or neither")
        return self

    @property
    def has_configured_price(self) -> bool:
        return self.cost_per_1k_input_tokens is not None


# Built-in module names of the signature kind, and the DSPy class each one builds.
BUILT_IN_MODULES = ("predict", "chain_of_thought")
ProgramKind = Literal["signature", "module", "saved"]
IMPORT_PATH_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"


class VariantSpec(_Strict):
    """A DSPy program, in one of three kinds:

    - signature: `signature` run by a built-in `module` (predict, chain_of_thought);
    - module: `module: "package.module:attribute"`, a dspy.Module subclass (built with no arguments)
      or a zero-argument factory returning one, imported from PROGRAMS_PATH or installed packages;
    - saved: `saved: dir/`, a whole program written by `module.save(dir, save_program=True)`
      (cloudpickle: loading runs code from the file, so `trust_pickle: true` must say it is trusted).

    `program` is a JSON state file written by DSPy's `module.save("x.json")` (demos, instructions),
    loaded into the module built from the spec. `models` pins named predictors (or a prefix of their
    names) to models of this file; `output_field` names the output that becomes the response's `output`.
    """

    key: str = ""
    signature: str | None = None
    module: str = "predict"
    instructions: str | None = None
    program: Path | None = None
    saved: Path | None = None
    trust_pickle: bool = False
    models: dict[str, str] = Field(default_factory=dict)
    output_field: str | None = None

    @property
    def kind(self) -> ProgramKind:
        if self.saved is not None:
            return "saved"
        return "module" if ":" in self.module else "signature"

    @field_validator("signature")
    @classmethod
    def _looks_like_signature(cls, value: str | None) -> str | None:
        if value is None:
            return value
        inputs, arrow, outputs = value.partition("->")
        if not arrow or not inputs.strip() or not outputs.strip():
            raise ValueError(f"signature {value!r} must look like 'inputs -> outputs'")
        return value

    @field_validator("module")
    @classmethod
    def _known_module(cls, value: str) -> str:
        if value in BUILT_IN_MODULES or re.match(IMPORT_PATH_PATTERN, value):
            return value
        raise ValueError(
            f"module {value!r} must be one of {', '.join(BUILT_IN_MODULES)} "
            "or an import path 'package.module:attribute'"
        )

    @field_validator("program")
    @classmethod
    def _json_state(cls, value: Path | None) -> Path | None:
        if value is not None and value.suffix != ".json":
            raise ValueError(f"program {str(value)!r} must be a .json file saved with DSPy's module.save()")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> VariantSpec:
        kind = self.kind
        if kind == "signature" and self.signature is None:
            raise ValueError("give a signature ('inputs -> outputs'), a module import path, or saved")
        if kind != "signature" and self.signature is not None:
            raise ValueError(
                f"signature belongs to predict/chain_of_thought variants, not to a {kind} program"
            )
        if kind != "signature" and self.instructions is not None:
            raise ValueError(
                f"instructions belong to predict/chain_of_thought variants, not to a {kind} program"
            )
        if kind == "saved":
            if self.module != "predict":
                raise ValueError("give saved or module, not both")
            if self.program is not None:
                raise ValueError("a saved program carries its own state: program does not apply")
            if not self.trust_pickle:
                raise ValueError(
                    "saved: loading a program saved with save_program=True runs code from its file "
                    "(cloudpickle); set trust_pickle: true if you trust where it came from"
                )
        return self


TENANT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$"


class BudgetLimit(_Strict):
    daily_usd: float = Field(gt=0, description="USD that may be spent per UTC day")


class BudgetsConfig(_Strict):
    """Daily spend budgets: per model (by its public name) and per tenant (named in the API keys)."""

    models: dict[str, BudgetLimit] = Field(default_factory=dict)
    tenants: dict[str, BudgetLimit] = Field(default_factory=dict)

    @field_validator("tenants")
    @classmethod
    def _tenant_names(cls, value: dict[str, BudgetLimit]) -> dict[str, BudgetLimit]:
        for name in value:
            if not re.match(TENANT_NAME_PATTERN, name):
                raise ValueError(f"tenant {name!r}: letters, digits and ._- only, up to 64 characters")
        return value


class ModelsConfig(_Strict):
    default_variant: str = "baseline"
    ab_testing_enabled: bool = False
    ab_weights: dict[str, float] = Field(default_factory=dict)
    models: dict[str, ModelSpec]
    variants: dict[str, VariantSpec]
    budgets: BudgetsConfig = Field(default_factory=BudgetsConfig)
    feedback: FeedbackMetrics = Field(default_factory=FeedbackMetrics)  # what POST /v1/feedback takes
    source: Path = Path("<memory>")

    @model_validator(mode="after")
    def _budgets_name_known_models(self) -> ModelsConfig:
        for key in self.budgets.models:
            if key not in self.models:
                raise ValueError(f"budgets.models names unknown model {key!r}")
        return self

    @field_validator("models", "variants")
    @classmethod
    def _not_empty(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not value:
            raise ValueError("must name at least one entry")
        return value

    @field_validator("ab_weights")
    @classmethod
    def _weights_normalized(cls, value: dict[str, float]) -> dict[str, float]:
        return normalize_weights(value) if value else value

    @model_validator(mode="after")
    def _references_resolve(self) -> ModelsConfig:
        if self.default_variant not in self.variants:
            raise ValueError(f"default_variant {self.default_variant!r} is not one of the variants")
        for key, model in self.models.items():
            for fallback in model.fallbacks:
                if fallback not in self.models:
                    raise ValueError(f"models.{key}.fallbacks names unknown model {fallback!r}")
                if fallback == key:
                    raise ValueError(f"models.{key}.fallbacks names the model itself")
        for key, variant_spec in self.variants.items():
            for prefix, pinned in variant_spec.models.items():
                if pinned not in self.models:
                    raise ValueError(f"variants.{key}.models.{prefix} names unknown model {pinned!r}")
        for variant in self.ab_weights:
            if variant not in self.variants:
                raise ValueError(f"ab_weights names unknown variant {variant!r}")
        if self.ab_testing_enabled and not self.ab_weights:
            raise ValueError("ab_testing_enabled needs ab_weights, e.g. {baseline: 0.9, cot: 0.1}")
        return self


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def load_models_config(path: Path) -> ModelsConfig:
    """Read and validate the models file; raise ConfigError naming file, entry and problem."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the models file: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the models file must be a mapping with `models` and `variants`")
    for section in ("models", "variants"):
        entries = raw.get(section)
        if isinstance(entries, dict):
            raw[section] = {
                key: ({**value, "key": key} if isinstance(value, dict) else value)
                for key, value in entries.items()
            }
    raw["source"] = path
    try:
        config = ModelsConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{_location(err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"{path}: {problems}") from None
    return _resolve_program_paths(config, path.parent)


def _resolve_program_paths(config: ModelsConfig, base: Path) -> ModelsConfig:
    """State files and saved-program directories are relative to the models file; each must exist."""
    variants = {}
    for key, variant in config.variants.items():
        update: dict[str, Path] = {}
        if variant.program is not None:
            program = variant.program if variant.program.is_absolute() else base / variant.program
            if not program.is_file():
                raise ConfigError(f"{config.source}: variants.{key}.program: no such file {program}")
            update["program"] = program
        if variant.saved is not None:
            saved = variant.saved if variant.saved.is_absolute() else base / variant.saved
            if not (saved / "program.pkl").is_file():
                raise ConfigError(
                    f"{config.source}: variants.{key}.saved: {saved} is not a directory written by "
                    "module.save(path, save_program=True) (no program.pkl in it)"
                )
            update["saved"] = saved
        variants[key] = variant.model_copy(update=update) if update else variant
    return config.model_copy(update={"variants": variants})
