"""The gateway as an AWS Lambda function: the handler, its config and `gateway package lambda`."""
