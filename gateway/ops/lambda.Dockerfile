# The gateway as a Lambda container image: AWS's Python 3.11 base image (the same runtime and
# Amazon Linux 2 the zip targets, with the Runtime Interface Emulator for local runs) and the
# bundle that `gateway package lambda` stages in task/. Build context: that command's --out folder.
#   gateway package lambda && docker build --platform linux/amd64 -t gateway-lambda build/lambda
# A dated tag, so rebuilds get the same base (override with --build-arg BASE=...).
ARG BASE=public.ecr.aws/lambda/python:3.11.2026.02.28.00
FROM ${BASE}
COPY task/ ${LAMBDA_TASK_ROOT}/
CMD ["gateway.serverless.lambda_handler.handler"]
