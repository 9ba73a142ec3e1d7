"""`dspy-service optimize`: run a DSPy optimizer on a served variant's program and write its state.

    dspy-service optimize --variant V --trainset train.jsonl \
        --optimizer labeled-fewshot|bootstrap-fewshot [--metric package.module:function] \
        [--model M] [--max-demos N] [--no-score] --out tuned.json

Configured from the environment exactly as `dspy-service serve` is (MODELS_CONFIG, PROGRAMS_PATH,
OPENAI_API_KEY, OPENAI_BASE_URL, a model's api_key_env ...): the program is built as the service
builds it and runs with the models file's LMs. Without OPENAI_API_KEY and OPENAI_BASE_URL, the
built-in simulator plays the provider, as it does for `serve`.

stdout: the summary; stderr: logs (LOG_LEVEL, default warning here), DSPy's progress, errors.
Exit codes: 0 written; 2 a problem the message on stderr names (arguments, configuration,
trainset, metric, program, optimizer); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dspy_service.models_config import ModelsConfig, VariantSpec
    from dspy_service.programs.optimizing import Optimized
    from dspy_service.settings import Settings

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_DESCRIPTION = """\
Run a DSPy optimizer on a served variant's program, with the models file's LMs, and write the
program's state (demos) to a JSON file that a new variant loads with `program: tuned.json`.

The trainset is JSONL, one example a line, as `dspy-service export` writes it:
  {"example": {"question": "...", "answer": "..."}, "inputs": ["question"]}
Each line becomes dspy.Example(**line["example"]).with_inputs(*line["inputs"]); other keys are ignored.

Optimizers:
  labeled-fewshot    dspy.LabeledFewShot(k=max_demos): training examples become the demos; no
                     provider calls (but for the scores)
  bootstrap-fewshot  dspy.BootstrapFewShot: runs the program (its tools too) on each example, keeps
                     the runs the metric passes (a true or nonzero value) as demos of every
                     predictor they went through, fills the remaining slots with training examples

Both start from the variant's program without its current demos, and give each predictor up to
--max-demos (bootstrap-fewshot: max_bootstrapped_demos = max_labeled_demos = N).

The default metric is exact match: every field of the example that is not an input must equal the
prediction's field of that name (text compared ignoring case and runs of whitespace).

Configured from the environment as `dspy-service serve` is (MODELS_CONFIG, PROGRAMS_PATH,
OPENAI_API_KEY, OPENAI_BASE_URL, ...); with neither key nor base URL the built-in simulator answers.
Prints a summary, with the variant entry that serves the result, to stdout; any problem is named on
stderr and exits 2.
"""


class _Refused(Exception):
    """A problem the user can fix: one line on stderr, exit 2."""


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def add_command(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `optimize` on the CLI's subcommands."""
    optimize = commands.add_parser(
        "optimize",
        help="run a DSPy optimizer on a variant's program and write its state file",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    optimize.add_argument("--variant", required=True, help="the variant (in the models file) to optimize")
    optimize.add_argument("--trainset", required=True, type=Path, help="the training examples (JSONL)")
    optimize.add_argument("--optimizer", required=True, choices=("labeled-fewshot", "bootstrap-fewshot"))
    optimize.add_argument(
        "--metric",
        metavar="PACKAGE.MODULE:FUNCTION",
        help="called as metric(example, prediction, trace=None); found in PROGRAMS_PATH first, then "
        "installed packages (default: exact match, see above)",
    )
    optimize.add_argument(
        "--model",
        help="the model (in the models file) the unpinned predictors use; pinned ones keep their own "
        "(default: the only model, if there is one)",
    )
    optimize.add_argument(
        "--max-demos", type=_positive, default=4, metavar="N", help="demos per predictor (default: 4)"
    )
    optimize.add_argument(
        "--no-score",
        action="store_true",
        help="skip measuring the metric on the trainset before and after (one run per example each)",
    )
    optimize.add_argument("--out", required=True, type=Path, help="the state file to write (.json)")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    os.environ.setdefault("LOG_LEVEL", "warning")  # a command's output, not a service's log
    # Logs, and what DSPy prints (BootstrapFewShot's tally), go to stderr: stdout is the summary's.
    with contextlib.redirect_stdout(sys.stderr):
        from dspy_service.serving import load_configuration

        loaded = load_configuration()
        if isinstance(loaded, int):
            return loaded
        settings, config = loaded
        try:
            summary = _optimize(args, settings, config, started)
        except _Refused as exc:
            print(f"dspy-service optimize: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("dspy-service optimize: interrupted; nothing written", file=sys.stderr)
            return EXIT_INTERRUPTED
    print(summary)
    return EXIT_OK


def _choose(config: ModelsConfig, args: argparse.Namespace) -> tuple[VariantSpec, str]:
    source = config.source
    spec = config.variants.get(args.variant)
    if spec is None:
        raise _Refused(
            f"--variant {args.variant!r} is not a variant of {source}; "
            f"its variants: {', '.join(config.variants)}"
        )
    if spec.kind == "saved":
        raise _Refused(
            f"variant {args.variant!r} is a saved program (saved:), whose state a state file cannot "
            "replace; optimize a signature or module variant"
        )
    if args.model is not None:
        if args.model not in config.models:
            raise _Refused(
                f"--model {args.model!r} is not a model of {source}; its models: {', '.join(config.models)}"
            )
        return spec, args.model
    if len(config.models) == 1:
        return spec, next(iter(config.models))
    raise _Refused(
        f"--model: {source} has several models ({', '.join(config.models)}); name the one the "
        "variant's unpinned predictors use"
    )


def _check_out(out: Path) -> None:
    if out.suffix != ".json":
        raise _Refused(f"--out {out}: a state file's name must end in .json (as `program:` asks)")
    directory = out.parent
    if not directory.is_dir():
        raise _Refused(f"--out {out}: no such directory {directory}")
    if not os.access(directory, os.W_OK):
        raise _Refused(f"--out {out}: the directory {directory} is not writable")


@contextlib.contextmanager
def _provider(settings: Settings) -> Iterator[str | None]:
    """With neither OPENAI_API_KEY nor OPENAI_BASE_URL, the built-in simulator on a free port (as
    `serve` embeds one; not SIMULATOR_PORT, which a running service may hold): its base URL."""
    if not settings.uses_simulator:
        yield None
        return
    import uvicorn

    from dspy_service.serving import free_port, warn_simulated
    from dspy_service.simulator import create_simulator_app

    port = free_port("127.0.0.1")
    server = uvicorn.Server(
        uvicorn.Config(
            create_simulator_app(),
            host="127.0.0.1",
            port=port,
            log_config=None,
            access_log=False,
            lifespan="off",
        )
    )
    thread = threading.Thread(target=server.run, name="simulator", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise _Refused(f"the built-in simulator did not start on 127.0.0.1:{port}")
        time.sleep(0.02)
    base_url = f"http://127.0.0.1:{port}/v1"
    warn_simulated(base_url)
    try:
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=5)


def _optimize(args: argparse.Namespace, settings: Settings, config: ModelsConfig, started: float) -> str:
    spec, model = _choose(config, args)
    _check_out(args.out)
    from dspy_service.errors import ConfigError
    from dspy_service.programs import (
        LanguageModels,
        configure_dspy,
        load_program,
        optimizing,
        pin_predictors,
        use_program_dirs,
    )
    from dspy_service.services import build_price_lookup, provider_credentials

    try:
        records = optimizing.read_trainset(args.trainset)
        configure_dspy(settings.program_threads)
        # The one variant, built as services.build_programs builds each (without the service's
        # request headers and tool metrics, which have no request here).
        use_program_dirs(settings.program_dirs)
        metric = optimizing.import_metric(args.metric) if args.metric else optimizing.exact_match
        try:
            program = load_program(spec, str(config.source))
        except ConfigError as exc:
            raise _Refused(str(exc)) from None
        trainset = optimizing.build_examples(records, program, args.trainset, need_labels=args.metric is None)
        with _provider(settings) as simulator_url:
            api_key, base_url = provider_credentials(settings, simulator_url)
            lms = LanguageModels(config.models, api_key=api_key, base_url=base_url)
            pin_predictors(program, lms.base)
            result = optimizing.optimize(
                program,
                lm=lms.base(model),
                lm_of=lms.base,
                trainset=trainset,
                optimizer=args.optimizer,
                metric=metric,
                max_demos=args.max_demos,
                score=not args.no_score,
            )
        optimizing.save_state(result.module, args.out)
    except optimizing.OptimizeFailed as exc:
        raise _Refused(str(exc)) from None
    prices = build_price_lookup(config)
    return _summary(args, config, spec, model, len(trainset), result, prices, time.perf_counter() - started)


def _summary(
    args: argparse.Namespace,
    config: ModelsConfig,
    spec: VariantSpec,
    model: str,
    examples: int,
    result: Optimized,
    prices: dict[str, Any],
    secs: float,
) -> str:
    from dspy_service.costs import price_usage

    metric = args.metric or "exact match"
    lines = [
        f"optimized variant {spec.key!r} with {args.optimizer} on {examples} examples "
        f"(model {model}, metric {metric}) in {secs:.1f} s",
        "demos per predictor:",
    ]
    for predictor in result.predictors:
        labelled = predictor.demos - predictor.bootstrapped
        lines.append(
            f"  {predictor.name}: {predictor.demos} "
            f"({predictor.bootstrapped} bootstrapped, {labelled} labelled)"
        )
    if result.score_before is not None and result.score_after is not None:
        before, after = result.score_before, result.score_after
        lines.append(f"metric on the trainset: {before.mean:.3f} before, {after.mean:.3f} after")
        if before.failed_runs or after.failed_runs:
            lines.append(
                f"  runs that failed (scored 0): {before.failed_runs} before, {after.failed_runs} after"
            )
    if result.failed_runs:
        lines.append(f"runs that failed while optimizing: {result.failed_runs}")
    usage = result.usage_by_model
    if usage:
        calls = ", ".join(f"{name} {entry[2]}" for name, entry in sorted(usage.items()))
        cost = price_usage(usage, prices.get)
        spent = f"${cost.cost_usd:.6f}" if cost.cost_usd is not None else "unknown (unpriced models)"
        lines.append(
            f"provider calls: {calls}; {cost.input_tokens} input and {cost.output_tokens} output tokens, "
            f"cost {spent}"
        )
    else:
        lines.append("provider calls: none")
    lines += [
        f"wrote {args.out}",
        "serve it as a new variant (models file):",
        _variant_snippet(config, spec, args.out),
    ]
    return "\n".join(lines)


def _variant_snippet(config: ModelsConfig, spec: VariantSpec, out: Path) -> str:
    """The variant's entry with `program:` pointing at the new state file (relative to the models
    file where it lies under its directory)."""
    import yaml

    entry: dict[str, Any] = spec.model_dump(mode="json", exclude_defaults=True, exclude={"key", "program"})
    if spec.kind == "signature":
        entry["module"] = spec.module  # written out even when it is the default, predict
    base = config.source.resolve().parent
    path = out.resolve()
    entry["program"] = str(path.relative_to(base)) if path.is_relative_to(base) else str(path)
    text = yaml.safe_dump({"variants": {f"{spec.key}-tuned": entry}}, sort_keys=False)
    return "\n".join(f"  {line}" for line in text.splitlines())
