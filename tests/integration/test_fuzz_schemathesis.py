"""Schemathesis against a real service process, driven by the service's own OpenAPI document:
every documented operation, generated valid and invalid requests, no 5xx, and every response
conforming to the schema (status, content type, headers, body).

The document is built at import with the service's own `build_openapi` for the settings and models
file the fuzzed process runs with (schemathesis needs it when collecting; its lazy fixture loader
does not work with pytest 9), and a test checks it is byte for byte what that process serves at
`/openapi.json`. The models file is the packaged one plus typed variants, so that generated requests
reach typed `inputs` (lists, a `Literal`, numbers, booleans) as well as text.
Bounded: at most MAX_EXAMPLES generated cases per operation, no per-example deadline.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, settings

from dspy_service.api.openapi import build_openapi
from dspy_service.models_config import load_models_config
from dspy_service.programs import configure_dspy, load_program
from dspy_service.settings import DEFAULT_MODELS_CONFIG, Settings
from tests.integration.conftest import base_env
from tests.support.processes import RedisServer, ServiceProcess, Simulator

API_KEY = "sk-fuzz-" + "f0" * 12
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_EXAMPLES = 150
TYPED_VARIANTS = {
    "typed": {"signature": "question: str, tags: list[str], level: Literal['low','high'] -> answer"},
    "typed_cot": {
        "signature": "question: str, score: float, urgent: bool, count: int -> answer",
        "module": "chain_of_thought",
    },
}


def models_file_text() -> str:
    """The packaged models file with the typed variants added."""
    raw = yaml.safe_load(DEFAULT_MODELS_CONFIG.read_text(encoding="utf-8"))
    raw["variants"].update(TYPED_VARIANTS)
    return yaml.safe_dump(raw, sort_keys=False)


def _document() -> dict[str, object]:
    """The document of a service with authentication on, the typed models file, and every other
    setting at its default."""
    defaults = Settings(_env_file=None, rate_limit="", metrics_public=False, max_input_chars=100_000)
    configure_dspy()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "models.yaml"
        path.write_text(models_file_text(), encoding="utf-8")
        config = load_models_config(path)
        programs = {key: load_program(spec, str(config.source)) for key, spec in config.variants.items()}
    return build_openapi(defaults, config, auth=True, programs=programs)


DOCUMENT = _document()
schema = schemathesis.openapi.from_dict(DOCUMENT)


@pytest.fixture(scope="module")
def fuzzed_service(
    redis_server: RedisServer, simulator: Simulator, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    """Authentication on, limits at their defaults, the packaged models file with typed variants."""
    workdir = tmp_path_factory.mktemp("fuzz")
    models = workdir / "models.yaml"
    models.write_text(models_file_text(), encoding="utf-8")
    env = {
        **base_env(redis_server, simulator),
        "API_KEYS": f"{API_KEY} fuzzers",
        "MODELS_CONFIG": str(models),
    }
    service = ServiceProcess(env, workdir, "fuzzed")
    service.start()
    yield service
    service.stop()


def test_the_fuzzed_document_is_the_one_the_service_serves(fuzzed_service: ServiceProcess) -> None:
    """What schemathesis generates from is exactly the service's /openapi.json."""
    response = httpx.get(fuzzed_service.url + "/openapi.json", headers=AUTH, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == orjson.loads(orjson.dumps(DOCUMENT))


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
def test_no_5xx_and_every_response_conforms(
    case: schemathesis.Case[Any], fuzzed_service: ServiceProcess
) -> None:
    """Whatever a client sends to a documented operation: no 5xx, and the answer matches the schema."""
    case.call_and_validate(base_url=fuzzed_service.url, headers=AUTH, timeout=30)
