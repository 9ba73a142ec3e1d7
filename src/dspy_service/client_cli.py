"""`dspy-service predict | costs`: a client for a running service.

The service's URL comes from `--url`, else DSPY_SERVICE_URL, else http://localhost:8080; an API key
from `--api-key`, else DSPY_SERVICE_API_KEY, sent as `Authorization: Bearer <key>`.

Exit codes: 0 done; 1 the service answered with an error (its message and request ID go to stderr);
2 a usage error; 3 the service could not be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

DEFAULT_URL = "http://localhost:8080"
URL_ENV = "DSPY_SERVICE_URL"
API_KEY_ENV = "DSPY_SERVICE_API_KEY"

EXIT_OK = 0
EXIT_SERVICE_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3


class ClientError(Exception):
    """A failure to report on stderr, with the exit code it ends the command with."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


def add_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `predict` and `costs` on the CLI's subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help=f"the service's base URL (default: ${URL_ENV}, else {DEFAULT_URL})")
    common.add_argument("--api-key", help=f"API key sent as a Bearer token (default: ${API_KEY_ENV})")
    common.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the answer")
    common.add_argument("--json", action="store_true", help="print the service's whole JSON response")

    predict = commands.add_parser(
        "predict", parents=[common], help="ask a running service for a prediction and print the answer"
    )
    predict.add_argument("input", help="the input text, e.g. a question")
    predict.add_argument("-m", "--model", required=True, help="a model name from the models file")
    predict.add_argument("--variant", help="a variant; default: the service's choice (A/B or default)")
    predict.add_argument("--user-id", help="keeps this user on one A/B variant")
    predict.add_argument(
        "-p",
        "--param",
        action="append",
        type=parse_param,
        default=[],
        metavar="KEY=VALUE",
        help="a parameter; VALUE is read as JSON when it parses (0.2, 100, true, [...]), else as text",
    )
    predict.add_argument("--no-cache", action="store_true", help="skip the service's cache")
    predict.add_argument("--request-id", help="the request ID to use (letters, digits, ._:-)")
    predict.add_argument(
        "-v", "--verbose", action="store_true", help="also print variant, cache, tokens and cost to stderr"
    )
    predict.set_defaults(client=_predict)

    costs = commands.add_parser("costs", parents=[common], help="print the service's cost table")
    costs.set_defaults(client=_costs)


def parse_param(text: str) -> tuple[str, Any]:
    name, equals, raw = text.partition("=")
    if not equals or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return name.strip(), value


def run(args: argparse.Namespace) -> int:
    """Run a client command; report failures on stderr and return the exit code."""
    # Imported here, not at module level: httpx (with rich and pygments beside it) costs the
    # service about 0.4 s of start-up, and only these client commands need it.
    import httpx

    command: Callable[[httpx.Client, argparse.Namespace], None] = args.client
    base_url = args.url or os.environ.get(URL_ENV) or DEFAULT_URL
    api_key = args.api_key or os.environ.get(API_KEY_ENV)
    headers = {"User-Agent": "dspy-service-cli"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    try:
        with httpx.Client(base_url=base_url, headers=headers, timeout=args.timeout) as client:
            command(client, args)
    except ClientError as exc:
        print(f"dspy-service: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except httpx.ConnectError as exc:
        print(
            f"dspy-service: cannot connect to {base_url} ({_reason(exc)}); is the service running? "
            f"Point --url or {URL_ENV} at it.",
            file=sys.stderr,
        )
        return EXIT_UNREACHABLE
    except httpx.TimeoutException:
        print(f"dspy-service: no answer from {base_url} within {args.timeout:g} s", file=sys.stderr)
        return EXIT_UNREACHABLE
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        print(f"dspy-service: request to {base_url} failed: {_reason(exc)}", file=sys.stderr)
        return EXIT_UNREACHABLE
    return EXIT_OK


def _reason(exc: Exception) -> str:
    text = str(exc)
    if "Connection refused" in text or "Errno 111" in text:
        return "connection refused"
    return text or type(exc).__name__


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    response = client.request(method, path, **kwargs)
    if response.is_success:
        return response
    try:
        error = response.json()["error"]
        kind, message = error["type"], error["message"]
        request_id = error.get("request_id") or response.headers.get("x-request-id")
    except (ValueError, KeyError, TypeError):
        snippet = " ".join(response.text.split())[:200]
        raise ClientError(
            f"HTTP {response.status_code} from {response.url}: {snippet}", EXIT_SERVICE_ERROR
        ) from None
    where = f"HTTP {response.status_code}" + (f", request id {request_id}" if request_id else "")
    retry = response.headers.get("retry-after")
    if retry:
        where += f", retry after {retry} s"
    raise ClientError(f"{kind}: {message} ({where})", EXIT_SERVICE_ERROR)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _predict(client: httpx.Client, args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"model": args.model, "input": args.input}
    if args.variant:
        body["variant"] = args.variant
    if args.user_id:
        body["user_id"] = args.user_id
    if args.param:
        body["parameters"] = dict(args.param)
    if args.no_cache:
        body["use_cache"] = False
    if args.request_id:
        body["request_id"] = args.request_id
    result = _call(client, "POST", "/v1/predict", json=body).json()
    if args.json:
        _print_json(result)
    else:
        output = result.get("output")
        print(output if isinstance(output, str) else json.dumps(output, ensure_ascii=False))
    if args.verbose:
        meta = result.get("metadata", {})
        cost = meta.get("cost_usd")
        print(
            f"variant={result.get('variant')} model_served={result.get('model_served')} "
            f"cache={meta.get('cache_level') or 'miss'} "
            f"tokens={meta.get('input_tokens')}/{meta.get('output_tokens')} "
            f"cost_usd={'unknown' if cost is None else cost} latency_ms={meta.get('latency_ms')} "
            f"request_id={result.get('request_id')}",
            file=sys.stderr,
        )


# The /costs counts that make its USD figures a floor, and what the table says of each.
_UNCOUNTED_SPEND = (
    ("unpriced_requests", "request(s) used a model with no known price; their cost is not included"),
    (
        "unmetered_calls",
        "provider call(s) were cut off before the provider reported their tokens; "
        "whatever they cost is not included",
    ),
)

COST_COLUMNS = (
    ("model:variant", None),
    ("requests", "total_requests"),
    ("hits", "cache_hits"),
    ("input tokens", "total_input_tokens"),
    ("output tokens", "total_output_tokens"),
    ("cost USD", "total_cost_usd"),
    ("saved USD", "cost_saved_usd"),
)


def format_costs(totals: dict[str, dict[str, Any]], scope: str | None) -> str:
    """The /costs totals as an aligned table with a total row."""
    if not totals:
        return "no predictions recorded yet"
    sums: dict[str, float] = {}
    rows: list[list[str]] = []
    for name, row in sorted(totals.items()):
        cells = [name]
        for _, field in COST_COLUMNS[1:]:
            assert field is not None
            value = row.get(field) or 0
            sums[field] = sums.get(field, 0) + value
            cells.append(_cell(field, value))
        rows.append(cells)
    if len(rows) > 1:
        rows.append(["total", *(_cell(f, sums[f]) for _, f in COST_COLUMNS[1:] if f is not None)])
    header = [title for title, _ in COST_COLUMNS]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        return "  ".join(
            [first, *(cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))]
        )

    out = [line(header), "  ".join("-" * width for width in widths)]
    out += [line(cells) for cells in rows]
    for field, says in _UNCOUNTED_SPEND:
        count = sum(int(row.get(field) or 0) for row in totals.values())
        if count:
            out.append(f"{count} {says}")
    if scope:
        out.append(
            f"scope: {scope} ({'every replica, from Redis' if scope == 'fleet' else 'this replica only'})"
        )
    return "\n".join(out)


def _cell(field: str, value: float) -> str:
    if field in ("total_cost_usd", "cost_saved_usd"):
        return f"{value:.6f}"
    return f"{int(value):,}"


def _costs(client: httpx.Client, args: argparse.Namespace) -> None:
    response = _call(client, "GET", "/costs")
    totals = response.json()
    if args.json:
        _print_json(totals)
        return
    print(format_costs(totals, response.headers.get("x-costs-scope")))
    if since := response.headers.get("x-costs-since"):
        print(f"since: {since} (when the state Redis began these totals)")
