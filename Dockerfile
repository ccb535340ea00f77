# Kade container image: a release build of the `kade` binary on Debian slim.
FROM rust:1-bookworm AS build
WORKDIR /src
RUN apt-get update && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
COPY . .
RUN cargo build --release --locked --features jpeg-ls --bin kade

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --home /var/lib/kade --create-home kade
COPY --from=build /src/target/release/kade /usr/local/bin/kade
COPY kade.example.toml /etc/kade/kade.example.toml
USER kade
WORKDIR /var/lib/kade
ENV KADE_DATA_DIR=/var/lib/kade/data
EXPOSE 11112
ENTRYPOINT ["kade"]
CMD ["serve"]
