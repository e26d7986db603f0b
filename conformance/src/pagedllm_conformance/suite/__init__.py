"""The conformance suite's tests: one upstream suite, run against whichever platform discovery selects."""
