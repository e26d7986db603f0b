"""Structured outputs: a grammar library constrains sampled tokens to a JSON schema, regex, choice or grammar."""
