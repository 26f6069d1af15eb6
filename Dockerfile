# mljob-operator image: one image for the operator, the collector and `mljob worker`.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator ./operator
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
RUN useradd --uid 10001 --create-home mljob
COPY --from=build /install /usr/local
USER 10001
ENTRYPOINT ["mljob"]
CMD ["operator"]
