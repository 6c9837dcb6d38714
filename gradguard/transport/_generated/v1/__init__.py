"""Generated from protos/gradguard/v1/aggregator.proto (package gradguard.v1) by `make proto`."""
