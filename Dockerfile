# One image for the operator (`datasync operator`) and the writers (`datasync worker`).
# Runs as uid/gid 10001 (the restricted Pod Security profile; the rendered Deployments set
# runAsUser 10001 and fsGroup 10001 so the DuckDB volume is writable); the root file system
# can be read-only: HOME=/tmp is an emptyDir in the pods.
FROM python:3.11-slim AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && groupadd --gid 10001 datasync \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin datasync
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080
ENTRYPOINT ["datasync"]
CMD ["operator"]
