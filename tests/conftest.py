import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# CI (.ci/run) sets FEDTUNE_REQUIRE_DOCKER=1: tests that need Docker then fail where there is no
# engine or no Compose v2, instead of passing by being skipped.
REQUIRE_DOCKER = os.environ.get("FEDTUNE_REQUIRE_DOCKER") == "1"


def docker_missing(reason: str) -> None:
    """Skip the calling test for `reason`, or fail it when Docker is required."""
    import pytest

    if REQUIRE_DOCKER:
        pytest.fail(f"FEDTUNE_REQUIRE_DOCKER=1 but {reason}", pytrace=False)
    pytest.skip(reason)
