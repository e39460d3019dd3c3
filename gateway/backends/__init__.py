"""One module per serving engine; ``gateway.backends.registry`` maps gateway.yaml's kinds to them."""
