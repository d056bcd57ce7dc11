# One image for the proxy and the sample backend; docker-compose.yml runs both.
FROM python:3.11-slim

WORKDIR /app

# the package first, so that editing a configuration does not reinstall it
COPY pyproject.toml README.md ./
COPY stickyproxy ./stickyproxy
COPY backend ./backend
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10001 --no-create-home stickyproxy

COPY config ./config

USER stickyproxy
EXPOSE 8080 9180
CMD ["stickyproxy", "run", "-c", "config/compose.toml"]
