"""The service's OpenAPI schema matches what it does: schemathesis sends generated requests, all checks on."""

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402 -- after the importorskip
from hypothesis import strategies as st  # noqa: E402
from schemathesis.specs.openapi.checks import negative_data_rejection  # noqa: E402

from newstune.config import CleanConfig  # noqa: E402
from newstune.data.text import clean_text  # noqa: E402
from newstune.serving.guard import has_visible  # noqa: E402
from newstune.serving.serve import MAX_CHARS, create_app  # noqa: E402

from .conftest import make_served  # noqa: E402

# Texts the schema calls valid ("format: visible-text", see its description): any Unicode with a character that
# neither the visibility rule nor the run's cleaning (HTML tags, entities) removes.
schemathesis.openapi.format("visible-text", st.text(min_size=1, max_size=200).filter(
    lambda text: has_visible(clean_text(text, CleanConfig()))))


@pytest.fixture(scope="module")
def api_schema(tiny_models):
    app = create_app({"topics": make_served(tiny_models["bert"], ["sports", "business", "science"]),
                      "fake_or_true": make_served(tiny_models["bert"], ["fake", "true"], name="fake_or_true")},
                     max_wait_ms=0)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def mutates_more_than_format(case) -> bool:
    """schemathesis "negates" a custom format by dropping it, so a draw whose only mutation is `format` may well be
    valid visible text (it flagged "Q\\t..." as invalid): the rejection check applies to every other negative draw."""
    mutations = getattr(case.meta.phase.data, "mutations", None) if case.meta else None
    if not mutations:
        return True
    return any(set(mutation.keywords) - {"format"} for mutation in mutations)


# schemathesis' own pytest plugin (schema.parametrize) fails under pytest 9 (it sets Function._nodeid), so its
# documented Hypothesis strategies drive the test instead: every operation, all checks, both generation modes.
@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_the_api_does_what_its_schema_says(api_schema, mode):
    @given(case=api_schema.as_strategy(mode))
    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def call_and_validate(case):
        excluded = [] if mutates_more_than_format(case) else [negative_data_rejection]
        # records: the schema requires the columns every served model needs (here `text`, with a text's rules), so
        # a schema-valid record must be accepted too (a record without `text` was a schema-valid 422)
        case.call_and_validate(excluded_checks=excluded)

    call_and_validate()


def test_the_schema_states_the_limits(api_schema):
    request = api_schema.raw_schema["components"]["schemas"]["ClassifyRequest"]["properties"]
    assert request["model"]["enum"] == ["topics", "fake_or_true"]
    assert request["texts"]["items"]["minLength"] == 1 and request["texts"]["items"]["maxLength"] == MAX_CHARS
    responses = api_schema.raw_schema["paths"]["/v1/classify"]["post"]["responses"]
    assert {"200", "400", "404", "413", "422"} <= set(responses)
    records = api_schema.raw_schema["components"]["schemas"]["ClassifyRecordsRequest"]["properties"]["records"]
    assert records["items"]["required"] == ["text"] and records["items"]["properties"]["text"]["minLength"] == 1
    assert "pattern" in request["texts"]["items"] and "pattern" in records["items"]["properties"]["text"]
    problem = api_schema.raw_schema["components"]["schemas"]["Problem"]["properties"]
    assert set(problem) == {"loc", "msg", "type"}
