"""Property-based API test: schemathesis generates requests from the OpenAPI spec (in-process, ASGI) and no
answer may be a 5xx; answers must match the documented responses and invalid requests must be refused."""

from __future__ import annotations

import pytest
import torch

schemathesis = pytest.importorskip("schemathesis", reason="pip install -e '.[dev]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from dallemini.pipeline import TextToImage  # noqa: E402
from dallemini.random_model import create_random_model  # noqa: E402
from dallemini.serve import ServeSettings, create_app  # noqa: E402

pytestmark = pytest.mark.slow

# No 5xx; status codes, content types and bodies as documented; invalid requests rejected.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    d = create_random_model(tmp_path_factory.mktemp("schema") / "tiny", preset="tiny")
    pipe = TextToImage.from_pretrained(d, device="cpu")
    # Small limits keep every generated request cheap; the stream is cut after a few events.
    app = create_app(pipe, ServeSettings(max_images=3, original_images=2, max_queue=64))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_server_errors(api_schema, mode: str) -> None:
    # Each operation gets its own bounded hypothesis run (schemathesis' pytest plugin is not used: its
    # lazy fixture loader breaks on current pytest).
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/generate", "/v1/generate/stream", "/generate"}
    for op in operations:

        @given(case=op.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(
            max_examples=20,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case) -> None:
            response = case.call(timeout=30)
            case.validate_response(response, checks=CHECKS)

        try:
            check()
        except Unsatisfiable:
            # No invalid request can be made for an operation without parameters (/health, /version).
            assert mode == "negative" and not (op.body or op.query or op.path_parameters), op.label
