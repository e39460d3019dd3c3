# The model files the pods copy into an emptyDir when they start (their init containers): the
# gateway's ONNX exports, Triton's model repository and TorchServe's archives, as
# `gateway models build` wrote them on the host. Build it from the repository root after that:
#   gateway models build
#   docker build -f deploy/k8s/models.Dockerfile -t classification-gateway-models:0.1.0 .
# A new build of the models is a new tag; the Deployments roll when kustomize's images: names it.
FROM busybox:1.37.0
COPY onnx/ /models/onnx/
COPY artifacts.json /models/artifacts.json
COPY model_repository/ /models/triton/
COPY torchserve/model_store/ /models/torchserve/
USER 1000:1000
