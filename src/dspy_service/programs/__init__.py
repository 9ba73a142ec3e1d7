"""DSPy programs and language models: the only package that imports dspy.

- `loading`: building a variant's program (signature, own module, saved program), its pins, fields;
- `fields`: input and output fields, their JSON Schemas, and the validation of typed inputs;
- `fingerprint`: the hash over a program's code, state and settings that keys its cache entries;
- `running`: one run, on the event loop or in a program thread, streaming or not;
- `failures`: what a failed run raises, classified from DSPy's exceptions;
- `lms`: the language models, with DSPy's native client built once;
- `tools`: tool calls observed through DSPy's callbacks.
"""

from dspy_service.programs.adapter import formatted_prompt_bytes
from dspy_service.programs.failures import FailureKind, ProgramFailed, UsageByModel
from dspy_service.programs.fields import FieldSpec, InputSchema
from dspy_service.programs.lms import LM_OPTIONS, LanguageModels, bundled_price, dspy_version
from dspy_service.programs.loading import (
    LoadedProgram,
    PredictorInfo,
    forget_program_modules,
    load_program,
    pin_predictors,
    use_program_dirs,
)
from dspy_service.programs.running import (
    ChunkSink,
    ProgramRun,
    ProgramThreads,
    configure_dspy,
    run_program,
    stream_program,
)
from dspy_service.programs.tools import ToolObserver

__all__ = [
    "LM_OPTIONS",
    "ChunkSink",
    "FailureKind",
    "FieldSpec",
    "InputSchema",
    "LanguageModels",
    "LoadedProgram",
    "PredictorInfo",
    "ProgramFailed",
    "ProgramRun",
    "ProgramThreads",
    "ToolObserver",
    "UsageByModel",
    "bundled_price",
    "configure_dspy",
    "dspy_version",
    "forget_program_modules",
    "formatted_prompt_bytes",
    "load_program",
    "pin_predictors",
    "run_program",
    "stream_program",
    "use_program_dirs",
]
