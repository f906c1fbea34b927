# tgi-compat for CUDA hosts, run like TGI's image:
#   docker run --gpus all -p 8080:80 -e MODEL_ID=org/model tgi-compat [extra flags]
# SageMaker runs `docker run IMAGE serve`: `tgi-compat serve` reads HF_MODEL_ID, SM_NUM_GPUS, ...
# and listens on 8080, as TGI's sagemaker-entrypoint.sh does.
# `text-generation-launcher` (TGI's image entrypoint) is the same program, so manifests with
# `command: [text-generation-launcher, ...]` and `--entrypoint text-generation-launcher` run unchanged.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data \
    PORT=80

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git curl \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/tgi-compat
COPY pyproject.toml README.md ./
COPY tgi_compat ./tgi_compat
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir --upgrade pip \
 && /opt/venv/bin/pip install --no-cache-dir ".[cuda]"
ENV PATH=/opt/venv/bin:$PATH

VOLUME /data
EXPOSE 80
ENTRYPOINT ["tgi-compat"]
CMD []
