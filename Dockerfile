FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service service
COPY models models
COPY workers workers
RUN pip install --no-cache-dir .
ENV PRELABEL_DATA_DIR=/data
VOLUME /data
EXPOSE 8000
CMD ["prelabel", "serve", "--host", "0.0.0.0", "--no-embedded-worker"]
