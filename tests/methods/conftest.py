"""The transformer pipelines a method test module may request (tests/methods/dit_fixtures.py)."""

from tests.methods.dit_fixtures import (  # noqa: F401 (session fixtures, found by pytest here)
    dit_pipe,
    dit_spec,
    flux_pipe,
    flux_spec,
    pixart_pipe,
    pixart_spec,
    sd3_pipe,
    sd3_spec,
    tiny_sd3_pipe,
    tiny_sd3_spec,
)
