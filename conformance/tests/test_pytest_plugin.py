"""The pytest11 plugin is loaded into every pytest run; outside the suite it must do nothing."""

from __future__ import annotations

pytest_plugins = ["pytester"]


def test_plugin_is_inert_when_no_suite_test_is_collected(pytester) -> None:
    pytester.makepyfile(test_plain="def test_plain():\n    assert True\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--conformance-platform", "no_such_backend")
    result.assert_outcomes(passed=1)
    assert "pagedllm conformance" not in result.stdout.str()
