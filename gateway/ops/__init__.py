"""Build, launch, package: model export and conversion, engine servers, the Lambda bundle.

Nothing that serves imports them (tests/test_layout.py)."""
