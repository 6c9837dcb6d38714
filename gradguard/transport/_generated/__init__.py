"""Code generated from protos/ by `make proto`; never edit by hand."""
